"""Face datasets: CSV indexing of image folders, triplet / labelled / LFW datasets, samplers and transforms."""
