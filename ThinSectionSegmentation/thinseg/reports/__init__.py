"""What a geologist reads off a segmentation: modal mineralogy tables and overlay pictures."""
