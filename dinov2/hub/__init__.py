"""Released DINOv2 models as Python functions (also exposed through ``hubconf.py``)."""
