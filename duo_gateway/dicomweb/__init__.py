"""DICOMweb (PS3.18): pure codecs for DUO's view routes."""
