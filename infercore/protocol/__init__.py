"""Protocol codecs: Open Inference Protocol V2 (JSON and binary tensor extension) and V1."""
