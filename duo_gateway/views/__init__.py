"""Views: remote studies shown in the timeline app's viewer over DICOMweb, before they are imported."""
