"""The GUI half of Slicer, faked small, so that the module panel (MSAExtension.py) and the Segment
Editor effect (SegmentEditorMSALib/SegmentEditorEffect.py) run headless with their real code.

What is fake: Qt widgets (a `qt` module with the few classes the two files use, holding state
and connections), Slicer's scripted base classes (`slicer.ScriptedLoadableModule`,
`SegmentEditorEffects.AbstractScriptedSegmentEditorEffect`), the effect's `scriptedEffect` object,
a slice view and its interactor. What is real: every MRML node (scene, volume, segmentation,
segment editor node, markups, slice node), the editing (`vtkSlicerSegmentEditorLogic`, the same
C++ that `modifySelectedSegmentByLabelmap` calls), the request worker and the MSA server.

`gui()` installs the fakes in sys.modules, imports the two files and hands back both modules;
`uninstall()` takes everything out again.
"""

from __future__ import annotations

import sys
import types
import unittest

import numpy as np

import slicer
import vtk
from MSAExtensionLib import make_editor_logic
from MSAExtensionLib.geometry import to_numpy


class FakeWidget:
    """A Qt widget: attributes for properties (text, checked, ...), connect / blockSignals / emit."""

    def __init__(self, *args, **kwargs):
        self.text = args[0] if args and isinstance(args[0], str) else ""
        self.checked = False
        self.wordWrap = False
        self.toolTip = ""
        self.children = []
        self._slots: dict[str, list] = {}
        self._blocked = False

    def connect(self, signal, slot):
        self._slots.setdefault(signal, []).append(slot)

    def blockSignals(self, blocked):
        old, self._blocked = self._blocked, bool(blocked)
        return old

    def emit(self, signal, *args):
        if not self._blocked:
            for slot in self._slots.get(signal, []):
                slot(*args)

    def setToolTip(self, text):
        self.toolTip = text

    def addWidget(self, widget):
        self.children.append(widget)


class FakeComboBox(FakeWidget):
    """QComboBox: items (text, data), currentIndex, currentIndexChanged(int) unless blocked."""

    def __init__(self, *args):
        super().__init__(*args)
        self.items: list[tuple[str, object]] = []
        self._current = -1

    @property
    def count(self):
        return len(self.items)

    @property
    def currentIndex(self):
        return self._current

    @currentIndex.setter
    def currentIndex(self, index):
        if index != self._current:
            self._current = index
            self.emit("currentIndexChanged(int)", index)

    @property
    def currentText(self):
        return self.items[self._current][0] if 0 <= self._current < len(self.items) else ""

    def addItem(self, text, data=None):
        self.items.append((text, data))
        if self._current < 0:
            self.currentIndex = 0

    def clear(self):
        self.items = []
        self.currentIndex = -1

    def itemData(self, index):
        return self.items[index][1] if 0 <= index < len(self.items) else None

    def findData(self, data):
        return next((n for n, (_, d) in enumerate(self.items) if d == data), -1)


class FakeTimer(FakeWidget):
    def setInterval(self, ms):
        self.interval = ms

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


class FakeSettings:
    values: dict = {}

    def value(self, key, default=None):
        return self.values.get(key, default)

    def setValue(self, key, value):
        self.values[key] = value


def _qt_module() -> types.ModuleType:
    qt = types.ModuleType("qt")
    qt.QTimer = FakeTimer
    qt.QSettings = FakeSettings
    qt.QComboBox = FakeComboBox
    for name in ("QRadioButton", "QPushButton", "QLabel", "QHBoxLayout", "QIcon", "QWidget"):
        setattr(qt, name, type(name, (FakeWidget,), {}))
    return qt


class AbstractScriptedSegmentEditorEffect:
    """SegmentEditorEffects.AbstractScriptedSegmentEditorEffect: keeps scriptedEffect; xyToRas as Slicer's."""

    def __init__(self, scriptedEffect):
        self.scriptedEffect = scriptedEffect

    @staticmethod
    def xyToRas(xy, viewWidget):
        matrix = viewWidget.sliceLogic().GetSliceNode().GetXYToRAS()
        return matrix.MultiplyPoint((float(xy[0]), float(xy[1]), 0.0, 1.0))[:3]


def _scripted_module() -> types.ModuleType:
    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleTest(unittest.TestCase):
        pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleWidget,
                ScriptedLoadableModuleTest):
        setattr(module, cls.__name__, cls)
    return module


class FakeScriptedEffect:
    """The `scriptedEffect` object Slicer gives an effect, over a REAL segment editor node and a
    REAL vtkSlicerSegmentEditorLogic (modifySelectedSegmentByLabelmap's own C++)."""

    def __init__(self, scene, segmentation, volume, segment_id):
        self.editor_node = slicer.vtkMRMLSegmentEditorNode()
        scene.AddNode(self.editor_node)
        self.editor_node.SetAndObserveSegmentationNode(segmentation)
        self.editor_node.SetAndObserveSourceVolumeNode(volume)
        self.editor_node.SetSelectedSegmentID(segment_id)
        self.logic = make_editor_logic(scene, segmentation, volume, self.editor_node)
        self.parameters: dict[str, str] = {}
        self.options: list = []
        self.undo_states = 0

    def parameterSetNode(self):
        return self.editor_node

    def _select(self):
        self.logic.SetCurrentSegmentID(self.editor_node.GetSelectedSegmentID())

    def defaultModifierLabelmap(self):
        self._select()
        assert self.logic.ResetModifierLabelmapToDefault()
        return self.logic.GetModifierLabelmap()

    def selectedSegmentLabelmap(self):
        self._select()
        return self.logic.GetSelectedSegmentLabelmap() if self.logic.UpdateSelectedSegmentLabelmap() else None

    def saveStateForUndo(self):
        self.undo_states += 1
        self.logic.SaveStateForUndo()

    def modifySelectedSegmentByLabelmap(self, labelmap, mode, extent):
        self._select()
        self.logic.ModifySegmentByLabelmap(self.editor_node.GetSegmentationNode(),
                                           self.editor_node.GetSelectedSegmentID(), labelmap, mode, extent, True, False)

    def addOptionsWidget(self, widget):
        self.options.append(widget)

    def addLabeledOptionsWidget(self, label, widget):
        self.options.append((label, widget))

    def sliceSpacing(self, viewWidget):
        volume = self.editor_node.GetSourceVolumeNode()
        return float(volume.GetSpacing()[2])

    # parameters (the MSA effect keeps none: its mode is the shared logic's)
    def setParameter(self, name, value):
        self.parameters[name] = str(value)

    def setParameterDefault(self, name, value):
        self.parameters.setdefault(name, str(value))

    def integerParameter(self, name):
        return int(self.parameters.get(name, 0))


class FakeSliceView:
    """A qMRMLSliceWidget over a REAL vtkMRMLSliceNode: an axial plane through `center_ras`,
    1 mm per pixel, `size` pixels."""

    def __init__(self, scene, center_ras, size=(400, 400)):
        self.node = slicer.vtkMRMLSliceNode()
        scene.AddNode(self.node)
        self.node.SetDimensions(size[0], size[1], 1)
        self.node.SetFieldOfView(float(size[0]), float(size[1]), 1.0)
        matrix = vtk.vtkMatrix4x4()
        for axis in range(3):
            matrix.SetElement(axis, 3, float(center_ras[axis]))
        self.node.GetSliceToRAS().DeepCopy(matrix)
        self.node.UpdateMatrices()

    def className(self):
        return "qMRMLSliceWidget"

    def sliceLogic(self):
        return types.SimpleNamespace(GetSliceNode=lambda: self.node)

    def xy(self, ras) -> tuple[int, int]:
        """The pixel showing `ras` (which must lie on the plane)."""
        xy = np.linalg.inv(to_numpy(self.node.GetXYToRAS())) @ np.array([*ras, 1.0])
        assert abs(xy[2]) < 1e-6, f"{ras} is not on the view's plane"
        return int(round(xy[0])), int(round(xy[1]))


class FakeInteractor:
    def __init__(self, xy=(0, 0), shift=False, control=False, key=""):
        self.xy, self.shift, self.control, self.key = xy, shift, control, key

    def GetEventPosition(self):
        return self.xy

    def GetShiftKey(self):
        return self.shift

    def GetControlKey(self):
        return self.control

    def GetKeySym(self):
        return self.key


_INSTALLED: dict[str, object] = {}
_IMPORTED = ("MSAExtension", "SegmentEditorMSALib", "SegmentEditorMSALib.SegmentEditorEffect")


def gui() -> types.SimpleNamespace:
    """Installs the fakes and imports the module and the effect -> namespace(module, effect_module)."""
    # Slicer's SegmentEditorEffects is a package; the effect imports its AbstractScriptedSegmentEditorEffect module.
    effects = types.ModuleType("SegmentEditorEffects")
    effects.__path__ = []
    abstract = types.ModuleType("SegmentEditorEffects.AbstractScriptedSegmentEditorEffect")
    abstract.AbstractScriptedSegmentEditorEffect = effects.AbstractScriptedSegmentEditorEffect = \
        AbstractScriptedSegmentEditorEffect
    abstract.__all__ = ["AbstractScriptedSegmentEditorEffect"]
    fakes = {"qt": _qt_module(), "SegmentEditorEffects": effects,
             "SegmentEditorEffects.AbstractScriptedSegmentEditorEffect": abstract,
             "slicer.ScriptedLoadableModule": _scripted_module()}
    for name, module in fakes.items():
        assert name not in sys.modules or name in _INSTALLED, f"a real {name} is loaded: not faking it"
        sys.modules[name] = module
        _INSTALLED[name] = module
    modes = slicer.vtkSlicerSegmentEditorLogic
    slicer.qSlicerSegmentEditorAbstractEffect = types.SimpleNamespace(
        ModificationModeAdd=modes.ModificationModeAdd, ModificationModeRemove=modes.ModificationModeRemove)
    import importlib

    import MSAExtension

    # The module, not the class: the package's __init__ star-imports the class under the same name.
    effect_module = importlib.import_module("SegmentEditorMSALib.SegmentEditorEffect")
    return types.SimpleNamespace(module=MSAExtension, effect_module=effect_module)


def uninstall() -> None:
    for name in (*_INSTALLED, *_IMPORTED):
        sys.modules.pop(name, None)
    _INSTALLED.clear()
    if hasattr(slicer, "qSlicerSegmentEditorAbstractEffect"):
        del slicer.qSlicerSegmentEditorAbstractEffect


def new_logic(module, url: str):
    """A fresh shared logic (MSAExtension.sharedLogic) talking to `url`."""
    logic = module.MSAExtensionLogic()
    logic.setUrl(url)
    module._shared = logic
    return logic


def new_effect(effect_module, scene, segmentation, volume, segment_id):
    """The MSA effect over a fake scriptedEffect, options built, activated on the selected segment."""
    scripted = FakeScriptedEffect(scene, segmentation, volume, segment_id)
    effect = effect_module.SegmentEditorEffect(scripted)
    effect.setupOptionsFrame()
    effect.setMRMLDefaults()
    effect.activate()
    effect.updateGUIFromMRML()
    return effect


def new_panel(module, logic):
    """The module panel's widget with the model choice (the .ui is not loaded: its widgets are fakes)."""
    panel = module.MSAExtensionWidget()
    panel.logic = logic
    panel.ui = types.SimpleNamespace(modelComboBox=FakeComboBox(), statusLabel=FakeWidget(),
                                     connectionLabel=FakeWidget())
    panel.setModels(["msa", "msa_2d"])
    panel.ui.modelComboBox.connect("currentIndexChanged(int)", panel.onModelChanged)
    logic.addDimensionListener(panel.onDimensionChanged)
    return panel


def record_requests(logic) -> list:
    """Every request the effect hands to the logic's worker, in order (its context: PendingRequest);
    the requests still run, on the real worker thread, against the real server."""
    submitted = []
    submit = logic.requests.submit

    def recording(fn, *args, context=None):
        submitted.append(context)
        return submit(fn, *args, context=context)

    logic.requests.submit = recording
    return submitted


def settle(effect, timeout: float = 300.0) -> None:
    """Lets the effect's timer tick until its requests are answered and applied (a request the
    effect sends again from its poll, after the server lost the image, included)."""
    requests = effect.logic().requests
    for _ in range(5):
        assert requests.idle(timeout), "the request did not finish"
        effect.onPoll()
        if not requests.busy:
            return
    raise AssertionError("the effect kept sending requests")
