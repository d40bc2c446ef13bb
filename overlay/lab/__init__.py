"""`overlayctl lab`: a whole cluster out of network namespaces on one machine."""
