"""File input/output: image readers, GeoSlicer netCDF, PP/XP pairing, atomic output files.

Submodules are imported on demand (`from thinseg.io.netcdf import NetcdfWriter`) so that the
CLI starts without loading netCDF4, tifffile or zarr.
"""
