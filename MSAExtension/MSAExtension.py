"""MSA (Medical SAM Adapter) for 3D Slicer: the module panel, its logic, and its self-test.

The interactive part is the Segment Editor effect "MSA" (SegmentEditorMSALib), registered here at
start-up. This panel holds the connection (server URL, models, backbone and adapters), the active
learning buttons (next sample, submit label, train adapters) and the list of shortcuts. Everything
that needs no Qt lives in MSAExtensionLib and is tested headless against a real server.
"""

import logging
import os
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from MSAExtensionLib import (DEFAULT_URL, EditorLogicTarget, ImageLost, MSAClient, MSAClientError, Prompts, Segmenter,
                             connection_summary, fetch_sample, info_outdated, make_editor_logic, mark_server_image,
                             prepare_label, prompt_nodes, reset_prompts, send_label, shortcuts_html, target_name,
                             train_progress)

URL_SETTING = "MSAExtension/ServerURL"
EFFECT_NAME = "MSA"


#
# Module
#


class MSAExtension(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MSA (Medical SAM Adapter)"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "Markups"]
        self.parent.contributors = ["MSA project contributors"]
        self.parent.helpText = (
            "Interactive segmentation with the Medical SAM Adapter served by an MSA MONAI Label server. "
            "Open the Segment Editor, pick the <b>MSA</b> effect, click inside a structure (or draw a box): "
            "the server answers with a 2D or slice-coherent 3D mask, written into the selected segment "
            "with undo, masking and the overwrite rules of the Segment Editor. Start a server with "
            "<code>make demo</code> in the MSA repository.")
        self.parent.acknowledgementText = (
            "Method: Wu et al., Medical SAM Adapter (2023). Backbone weights: LiteMedSAM (Apache-2.0). "
            "Sample data: TotalSegmentator test files (Apache-2.0).")
        # The effect can only be registered once the Segment Editor's effect factory exists.
        slicer.app.connect("startupCompleted()", registerEffect)


def registerEffect():
    """Adds the MSA effect to the Segment Editor (called at start-up)."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    effect = effects.qSlicerSegmentEditorScriptedEffect(None)
    path = os.path.join(os.path.dirname(__file__), "SegmentEditorMSALib", "SegmentEditorEffect.py")
    effect.setPythonSource(path.replace("\\", "/"))
    effect.self().register()


#
# Logic
#

_shared = None


def sharedLogic():
    """The one logic of this Slicer session: the panel and the effect share its server connection,
    its uploaded-image memory and its request worker."""
    global _shared
    if _shared is None:
        _shared = MSAExtensionLogic()
    return _shared


class MSAExtensionLogic(ScriptedLoadableModuleLogic):
    """Server connection and the operations behind the panel's buttons (usable from scripts)."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        from MSAExtensionLib import LatestRequestWorker

        self.url = str(qt.QSettings().value(URL_SETTING, DEFAULT_URL) or DEFAULT_URL)
        self._segmenter = None
        self.info = None
        self._dimension = 3
        self._dimensionListeners = []  # weak references to callables(dimension)
        self.requests = LatestRequestWorker()  # the effect's clicks: newest wins

    # The one mode of the session: 3 = msa (propagate), 2 = msa_2d (one slice). The panel's model
    # choice, the effect's buttons and its T key set it; the effect reads it for every request, and
    # the widgets showing it are told of each change.

    @property
    def dimension(self):
        return self._dimension

    @dimension.setter
    def dimension(self, value):
        value = 2 if int(value) == 2 else 3
        if value == self._dimension:
            return
        self._dimension = value
        for reference in list(self._dimensionListeners):
            listener = reference()
            if listener is None:
                self._dimensionListeners.remove(reference)
            else:
                listener(value)

    def addDimensionListener(self, listener):
        """listener(dimension) after each change; held weakly (a closed panel or effect drops out)."""
        self.removeDimensionListener(listener)
        self._dimensionListeners.append(weakref.WeakMethod(listener) if hasattr(listener, "__self__")
                                        else weakref.ref(listener))

    def removeDimensionListener(self, listener):
        self._dimensionListeners = [r for r in self._dimensionListeners if r() is not None and r() != listener]

    def setUrl(self, url):
        url = url.strip()
        if url != self.url:
            self.url = url
            self._segmenter = None  # new server: forget which images it has
            self.info = None
            qt.QSettings().setValue(URL_SETTING, url)

    @property
    def segmenter(self):
        if self._segmenter is None:
            self._segmenter = Segmenter(MSAClient(self.url))
        return self._segmenter

    def connect(self):
        """GET /info/ -> (summary line, MSA models, strategies); MSAClientError when unusable."""
        client = self.segmenter.client
        info = client.info()
        models = client.msa_models(info)
        self.info = info
        self.segmenter.images.forget()  # a restarted server may lack what it had: look again (HEAD)
        return connection_summary(info, models), models, list(info.get("strategies", {}))

    def segment(self, volumeNode, segmentationNode, segmentId, prompts, dimension=3, sliceK=None, editorNode=None):
        """Synchronous request + write through the Segment Editor logic (scripts, self-test).

        Needs Slicer 5.10 or later (vtkSlicerSegmentEditorLogic); the effect works without it."""
        logic = make_editor_logic(segmentationNode.GetScene(), segmentationNode, volumeNode, editorNode)
        target = EditorLogicTarget(logic, segmentId)
        result, report = self.segmenter.segment(target, volumeNode, prompts, dimension, sliceK,
                                                text=self.targetName(segmentationNode, segmentId))
        self.noteAnswer(result.params)
        return result, report

    def noteAnswer(self, params):
        """Other adapters answered than /info/ described: read it again before the next request."""
        if info_outdated(self.info, params):
            self.info = None

    def targetName(self, segmentationNode, segmentId):
        """The segment's name as a target prompt, when the server's adapters learnt it (else None)."""
        if self.info is None:
            try:
                self.connect()
            except MSAClientError:
                return None  # the request itself will say what is wrong with the server
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        return target_name(segment.GetName(), self.info) if segment is not None else None

    def prepareLabel(self, volumeNode, segmentationNode):
        return prepare_label(self.segmenter.images, volumeNode, segmentationNode)

    def sendLabel(self, prepared):
        return send_label(self.segmenter.client, self.segmenter.images, prepared)

    def fetchSample(self, strategy):
        folder = tempfile.mkdtemp(prefix="msa-sample-", dir=slicer.app.temporaryPath)
        return fetch_sample(self.segmenter.client, strategy, folder)

    def loadSample(self, imageId, path):
        """Loads a downloaded sample and marks it as the server's image (never uploaded back)."""
        volumeNode = slicer.util.loadVolume(path, {"name": imageId})
        mark_server_image(volumeNode, imageId)
        return volumeNode

    def train(self):
        return self.segmenter.client.train("msa")

    def stopTraining(self):
        return self.segmenter.client.stop_training()

    def trainStats(self):
        return self.segmenter.client.train_stats("msa")


#
# Widget
#


def readable(error):
    """The message shown for a failed task: the client's own sentence, else the error's type and text."""
    if isinstance(error, MSAClientError):
        return str(error)
    return f"unexpected {type(error).__name__}: {error} (details in the Python console)"


class MSAExtensionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.tasks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="MSA panel")  # in order, off the GUI
        self.running = []  # (future, what, then)
        self.statsPending = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MSAExtension.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = sharedLogic()

        self.ui.serverUrlLineEdit.text = self.logic.url
        self.ui.shortcutsLabel.text = shortcuts_html()
        self.setModels(["msa", "msa_2d"])
        for name in ("random", "first", "uncertainty"):
            self.ui.strategyComboBox.addItem(name)

        self.ui.serverUrlLineEdit.connect("editingFinished()", self.onUrlChanged)
        self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.logic.addDimensionListener(self.onDimensionChanged)  # the effect's T key and buttons
        self.ui.segmentEditorButton.connect("clicked(bool)", self.onSegmentEditor)
        self.ui.resetClicksButton.connect("clicked(bool)", self.onResetClicks)
        self.ui.nextSampleButton.connect("clicked(bool)", self.onNextSample)
        self.ui.submitLabelButton.connect("clicked(bool)", self.onSubmitLabel)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.stopTrainingButton.connect("clicked(bool)", self.onStopTraining)

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(150)
        self.pollTimer.connect("timeout()", self.onPoll)
        self.trainTimer = qt.QTimer()
        self.trainTimer.setInterval(2000)
        self.trainTimer.connect("timeout()", self.onTrainTimer)

    def cleanup(self):
        self.pollTimer.stop()
        self.trainTimer.stop()
        self.removeObservers()
        if self.logic is not None:
            self.logic.removeDimensionListener(self.onDimensionChanged)
        self.tasks.shutdown(wait=False)

    # -- tasks off the GUI thread ------------------------------------------------------------

    def status(self, text):
        self.ui.statusLabel.text = text

    def run(self, what, fn, then=None, failed=None, quiet=False):
        """Runs fn() on the panel's worker thread; `then(result)` (or `failed(error)`) runs on the
        GUI thread afterwards. Errors end on the status line, never in a traceback dialog."""
        if not quiet:
            self.status(f"{what}...")
        self.running.append((self.tasks.submit(fn), what, then, failed, quiet))
        self.pollTimer.start()

    def onPoll(self):
        for item in [item for item in self.running if item[0].done()]:
            self.running.remove(item)
            future, what, then, failed, quiet = item
            error = future.exception()
            if error is not None:
                if not isinstance(error, MSAClientError):
                    logging.error(f"MSA: {what} failed", exc_info=error)
                self.status(f"{what} failed: {readable(error)}")
                if failed is not None:
                    failed(error)
                continue
            if not quiet:
                self.status(f"{what}: done")
            if then is not None:
                try:
                    then(future.result())
                except Exception as exc:  # a panel update must not raise into Qt
                    logging.exception(f"MSA: {what}")
                    self.status(f"{what} failed: {readable(exc)}")
        if not self.running:
            self.pollTimer.stop()

    # -- server ------------------------------------------------------------------------------

    def onUrlChanged(self):
        self.logic.setUrl(self.ui.serverUrlLineEdit.text)

    def onTestConnection(self):
        try:
            self.onUrlChanged()
            self.logic.segmenter  # a malformed URL is reported here
        except MSAClientError as exc:
            self.ui.connectionLabel.text = str(exc)
            return

        def shown(answer):
            summary, models, strategies = answer
            self.ui.connectionLabel.text = summary
            self.setModels(models)
            self.ui.strategyComboBox.clear()
            for name in strategies:
                self.ui.strategyComboBox.addItem(name)

        def failed(error):
            self.ui.connectionLabel.text = readable(error)

        self.ui.connectionLabel.text = f"Connecting to {self.logic.url}..."
        self.run("Test connection", self.logic.connect, shown, failed)

    @staticmethod
    def modelDimension(name):
        return 2 if (name or "").endswith("2d") else 3

    def setModels(self, models):
        """The model choice lists the server's MSA models and shows the session's mode (the shared
        logic's dimension); a server without the model of that mode switches the mode."""
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for name in models:
            combo.addItem(f"{name} ({'2D, one slice' if self.modelDimension(name) == 2 else '3D, propagate'})", name)
        combo.blockSignals(wasBlocked)
        if models and not any(self.modelDimension(name) == self.logic.dimension for name in models):
            self.logic.dimension = self.modelDimension(models[0])
        self.onDimensionChanged(self.logic.dimension)

    def onModelChanged(self, index):
        """The user picked a model: it becomes the session's mode, which the MSA effect uses."""
        if index < 0:
            return
        self.logic.dimension = self.modelDimension(self.ui.modelComboBox.itemData(index))

    def onDimensionChanged(self, dimension):
        """The mode changed (here, or in the effect): select its model without re-emitting."""
        combo = self.ui.modelComboBox
        for index in range(combo.count):
            if self.modelDimension(combo.itemData(index)) == dimension:
                wasBlocked = combo.blockSignals(True)
                combo.currentIndex = index
                combo.blockSignals(wasBlocked)
                return

    # -- segmentation ------------------------------------------------------------------------

    def editorWidget(self):
        return slicer.modules.segmenteditor.widgetRepresentation().self().editor

    def currentNodes(self):
        """(volume, segmentation): the panel's choice, else the Segment Editor's."""
        volume = self.ui.volumeSelector.currentNode()
        segmentation = self.ui.segmentationSelector.currentNode()
        editorNode = self.editorWidget().mrmlSegmentEditorNode()
        if segmentation is None and editorNode is not None:
            segmentation = editorNode.GetSegmentationNode()
        if volume is None and editorNode is not None:
            volume = editorNode.GetSourceVolumeNode() if hasattr(editorNode, "GetSourceVolumeNode") else None
        return volume, segmentation

    def onSegmentEditor(self):
        volume, segmentation = self.currentNodes()
        if volume is None:
            self.status("Select a volume first (or load one with Next sample).")
            return
        if segmentation is None:
            segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume.GetName()} MSA")
            segmentation.CreateDefaultDisplayNodes()
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            segmentation.GetSegmentation().AddEmptySegment("", "Segment_1")
            self.ui.segmentationSelector.setCurrentNode(segmentation)
        slicer.util.selectModule("SegmentEditor")
        editor = self.editorWidget()
        editor.setSegmentationNode(segmentation)
        if hasattr(editor, "setSourceVolumeNode"):
            editor.setSourceVolumeNode(volume)
        else:  # Slicer < 5.2
            editor.setMasterVolumeNode(volume)
        editor.setActiveEffectByName(EFFECT_NAME)

    def onResetClicks(self):
        volume, segmentation = self.currentNodes()
        editorNode = self.editorWidget().mrmlSegmentEditorNode()
        segmentId = editorNode.GetSelectedSegmentID() if editorNode is not None else None
        if segmentation is None or not segmentId:
            self.status("Select a segment in the Segment Editor first.")
            return
        nodes = prompt_nodes(segmentation, segmentId, create=False)
        if nodes is not None:
            reset_prompts(nodes)
        self.status("Points and box removed; the segment is unchanged.")

    # -- active learning ---------------------------------------------------------------------

    def onNextSample(self):
        strategy = self.ui.strategyComboBox.currentText or "random"

        def load(sample):
            if sample is None:
                self.status(f"The server has no image left to label ({strategy}).")
                return
            imageId, path = sample
            volume = self.logic.loadSample(imageId, path)
            self.ui.volumeSelector.setCurrentNode(volume)
            self.ui.segmentationSelector.setCurrentNode(None)
            slicer.util.setSliceViewerLayers(background=volume, fit=True)
            self.status(f"Loaded {imageId} (from the server: it is not uploaded again).")

        self.run("Next sample", lambda: self.logic.fetchSample(strategy), load)

    def onSubmitLabel(self, _checked=False, retried=False):
        volume, segmentation = self.currentNodes()
        if volume is None or segmentation is None:
            self.status("Select the volume and its segmentation first.")
            return
        try:
            prepared = self.logic.prepareLabel(volume, segmentation)  # reads MRML: GUI thread
        except MSAClientError as exc:
            self.status(str(exc))
            return

        def failed(error):
            if isinstance(error, ImageLost) and not retried:  # the server lost the image: upload it again
                self.onSubmitLabel(retried=True)

        self.run("Submit label", lambda: self.logic.sendLabel(prepared),
                 lambda answer: self.status(f"Label saved on the server for image {answer.get('image')}."), failed)

    def onTrain(self):
        def started(_answer):
            self.trainTimer.start()
            self.status("Training started on the server.")

        self.run("Train adapters", self.logic.train, started)

    def onStopTraining(self):
        self.run("Stop training", self.logic.stopTraining)

    def onTrainTimer(self):
        if self.statsPending:
            return
        self.statsPending = True

        def shown(stats):
            self.statsPending = False
            percent, text = train_progress(stats)
            self.ui.trainProgressBar.value = percent
            self.ui.trainStatusLabel.text = text
            if stats.get("status") in ("DONE", "FAILED", "STOPPED"):
                self.trainTimer.stop()

        def failed(_error):
            self.statsPending = False

        self.run("Training status", self.logic.trainStats, shown, failed, quiet=True)


#
# Test
#

# The sample CT of `make demo` (image id ct_abdomen): a voxel deep inside the spleen, (i, j, k).
SAMPLE_IMAGE = "ct_abdomen"
SAMPLE_SPLEEN_IJK = (25, 32, 23)  # the spleen's interior-most voxel (distance transform)


class MSAExtensionTest(ScriptedLoadableModuleTest):
    """Self-test for users: needs an MSA server at the module's URL (`make demo`)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_point_in_sample_ct()

    def test_point_in_sample_ct(self):
        self.delayDisplay("Connecting to the MSA server")
        logic = MSAExtensionLogic()
        try:
            summary, _, _ = logic.connect()
        except MSAClientError as exc:
            self.fail(f"{exc} -- the self-test needs a running MSA server (make demo)")
        self.delayDisplay(summary)

        self.delayDisplay("Loading the sample CT from the server")
        client = logic.segmenter.client
        if not client.image_exists(SAMPLE_IMAGE):
            self.fail(f"the server has no image {SAMPLE_IMAGE!r}: start it with make demo")
        folder = tempfile.mkdtemp(prefix="msa-selftest-", dir=slicer.app.temporaryPath)
        name, content = client.download_image(SAMPLE_IMAGE)
        path = os.path.join(folder, os.path.basename(name) or f"{SAMPLE_IMAGE}.nii.gz")
        with open(path, "wb") as handle:
            handle.write(content)
        volume = logic.loadSample(SAMPLE_IMAGE, path)

        self.delayDisplay("Placing a point in the spleen")
        ijkToRas = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijkToRas)
        ras = ijkToRas.MultiplyPoint([*SAMPLE_SPLEEN_IJK, 1.0])[:3]
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MSA self-test")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentId = segmentation.GetSegmentation().AddEmptySegment("spleen", "spleen")
        result, report = logic.segment(volume, segmentation, segmentId, Prompts(positive=[list(ras)]), dimension=3)
        self.delayDisplay(result.status())

        voxels = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
        self.assertGreater(int(voxels.sum()), 0, "the segment is empty")
        self.assertTrue(report.changed)
        i, j, k = SAMPLE_SPLEEN_IJK
        self.delayDisplay(f"{int(voxels.sum())} voxels; the clicked voxel is "
                          f"{'inside' if voxels[k, j, i] else 'outside (check the served adapters)'}")
        self.delayDisplay("Test passed")
