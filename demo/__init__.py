"""The synthetic demo dataset: procedurally drawn faces (`render`) laid out like VGGFace2 and LFW."""
