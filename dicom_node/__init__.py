"""DICOM network node that enhances radiographs with interpretable per-pixel LUT maps."""
