"""ODX import: a PDX diagnostic database into `ecus:` config entries (DIDs with codecs, routines,
security levels, DTC texts, CAN ids). A workstation tool: odxtools is an optional extra, imported only
when `sovd-edge import-odx` runs; the device never loads a PDX.
May import: config, errors."""
