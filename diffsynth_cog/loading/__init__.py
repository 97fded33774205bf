"""Reading weights from raw files and converting their keys onto our models."""
