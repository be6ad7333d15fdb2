"""FLOPs and bytes moved by one optimizer step (``flops``), its time on a device (``timing``) and the
efficiency fitted from measured runs (``calibrate``). Imports the core, ``model`` and ``memory``."""
