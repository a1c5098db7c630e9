# One virtual environment for everything; `make test` is what CI runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

PORT ?= 8000
STUDIES ?= studies

.PHONY: venv test demo clean

$(BIN)/msa: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: pip takes this build from the machine's local disk.
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/msa

test: venv
	$(BIN)/python -m pytest -q

# The main job: a MONAI Label server with MSA on the sample CT, for 3D Slicer or any MONAI Label client.
demo: venv
	mkdir -p $(STUDIES)
	test -e $(STUDIES)/ct_abdomen.nii.gz || cp lib/msa/sample_data/ct_abdomen.nii.gz $(STUDIES)/
	@echo ""
	@echo "MSA server starting on http://127.0.0.1:$(PORT) (first start: the model loads in a few seconds)."
	@echo "In 3D Slicer: add this repository's MSAExtension folder in Application Settings > Modules, open"
	@echo "the module 'MSA (Medical SAM Adapter)', press 'Test connection' (http://127.0.0.1:$(PORT)), then"
	@echo "'Next sample' and 'Segment with MSA', and click in an organ (README.md: Use it in 3D Slicer)."
	@echo "The stock MONAILabel plugin works only on images already in the datastore (its Next Sample): this"
	@echo "server refuses sessions and image files sent with an infer request (models msa and msa_2d)."
	@echo ""
	PATH="$(abspath $(BIN)):$$PATH" monailabel start_server --app monailabel_app --studies $(STUDIES) --host 127.0.0.1 --port $(PORT)

clean:
	rm -rf $(VENV)
