"""Generated from proto/tandem/v1 by proto/generate.py; do not edit."""
