"""What every layer uses: atomic files and safe names, distributed helpers, process settings and signals."""
