"""The MSA MONAI Label app's own code: thin task classes over the `msa` package."""
