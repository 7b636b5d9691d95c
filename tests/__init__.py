"""The test suite; its folders mirror the package (models/, tasks/, data/, layers/, bench/...)."""
