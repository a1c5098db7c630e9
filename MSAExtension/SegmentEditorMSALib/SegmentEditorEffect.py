"""Segment Editor effect "MSA": clicks and boxes in the slice views -> the MSA server -> the segment.

Prompts live in markups nodes per segment (MSAExtensionLib.prompts), so they are visible, can be
dragged (every change re-sends them), and survive a scene save. A request is prepared on the GUI
thread (world RAS -> IJK, which volume), sent by the shared logic's worker thread (a newer click
replaces a pending one; an answer overtaken by a newer click is dropped), and its mask is written
back on the GUI thread through this effect's own editing path: saveStateForUndo +
modifySelectedSegmentByLabelmap (masking, editable intensity range, overwrite rules, undo).

The mode (2D msa_2d / 3D msa) has one home: the shared logic's `dimension`. The module panel's
model choice, this effect's radio buttons and the T key all set it, and both widgets follow it.
"""

import logging
import os
from dataclasses import dataclass

import numpy as np
import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from MSAExtensionLib import (ImageLost, MSAClientError, add_point, apply_result, edited_slice, make_request,
                             prompt_nodes, prompts_from_nodes, reset_prompts, run_request, set_box, shortcuts_html)
from MSAExtensionLib.prompts import resetting
from MSAExtensionLib.geometry import ijk_to_ras

POLL_MS = 100


class EffectTarget:
    """MSAExtensionLib's EditorTarget over this effect's scriptedEffect (the Segment Editor's own path)."""

    def __init__(self, scriptedEffect):
        self.effect = scriptedEffect

    @property
    def segmentation_node(self):
        return self.effect.parameterSetNode().GetSegmentationNode()

    def modifier_labelmap(self):
        return self.effect.defaultModifierLabelmap()  # reset to the reference geometry, empty

    def selected_segment_labelmap(self):
        return self.effect.selectedSegmentLabelmap()

    def save_state_for_undo(self):
        self.effect.saveStateForUndo()

    def modify(self, labelmap, mode, extent):
        modes = {"add": slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeAdd,
                 "remove": slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeRemove}
        self.effect.modifySelectedSegmentByLabelmap(labelmap, modes[mode], list(extent))


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Clicks, boxes and a 3D ROI sent to an MSA server; 2D (msa_2d) or 3D (msa) answers."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "MSA"
        scriptedEffect.perSegment = True  # writes the selected segment only
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.nodes = None  # PromptNodes of the selected segment
        self.observed = None  # (segmentation node id, segment id) whose prompt nodes are observed
        self.observerTags = []
        self.boxStart = None  # (view widget, xy) while a shift+drag box is drawn
        self.rightPress = None  # xy of a right button press (a click, unless the mouse moves: zoom)
        self.pending = False
        self.removedSlice = None  # slice of a point about to be deleted (2D: the request answers there)
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.onPoll)

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        path = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        return qt.QIcon(path) if os.path.exists(path) else qt.QIcon()

    def helpText(self):
        return ("<html>Segment with the <b>Medical SAM Adapter</b> served by an MSA server (module MSA: server "
                "URL, Test connection). Each click or box updates the selected segment; undo with Z / Ctrl+Z."
                "<p>" + shortcuts_html() + "</html>")

    # -- options -----------------------------------------------------------------------------

    def setupOptionsFrame(self):
        self.mode3dButton = qt.QRadioButton("3D: propagate (msa)")
        self.mode2dButton = qt.QRadioButton("2D: this slice (msa_2d)")
        modeLayout = qt.QHBoxLayout()
        modeLayout.addWidget(self.mode3dButton)
        modeLayout.addWidget(self.mode2dButton)
        self.scriptedEffect.addLabeledOptionsWidget("Mode:", modeLayout)
        self.mode3dButton.connect("toggled(bool)", self.updateMRMLFromGUI)

        self.roiButton = qt.QPushButton("3D box (ROI)")
        self.roiButton.setToolTip("Place a box around the slice views' centre; drag its handles, the segment follows")
        self.propagateButton = qt.QPushButton("Propagate (P)")
        self.propagateButton.setToolTip("Send every point and the box to the 3D model now")
        self.resetButton = qt.QPushButton("Reset clicks (C)")
        self.resetButton.setToolTip("Remove this segment's points and box; the segment itself stays")
        buttons = qt.QHBoxLayout()
        for button in (self.roiButton, self.propagateButton, self.resetButton):
            buttons.addWidget(button)
        self.scriptedEffect.addOptionsWidget(buttons)
        self.roiButton.connect("clicked()", self.onPlaceRoi)
        self.propagateButton.connect("clicked()", self.onPropagate)
        self.resetButton.connect("clicked()", self.onReset)

        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)
        self.logic().addDimensionListener(self.onDimensionChanged)
        self.onDimensionChanged(self.dimension())

    def setMRMLDefaults(self):
        pass  # the mode is the shared logic's (one source for the panel and this effect), not a parameter

    def updateGUIFromMRML(self):
        self.onDimensionChanged(self.dimension())
        self.followSelectedSegment()

    def updateMRMLFromGUI(self):
        self.logic().dimension = 3 if self.mode3dButton.checked else 2

    def onDimensionChanged(self, dimension):
        """The shared mode changed (panel, T key, these buttons): show it."""
        for button, checked in ((self.mode3dButton, dimension != 2), (self.mode2dButton, dimension == 2)):
            wasBlocked = button.blockSignals(True)
            button.checked = checked
            button.blockSignals(wasBlocked)

    # -- life cycle --------------------------------------------------------------------------

    def logic(self):
        import MSAExtension

        return MSAExtension.sharedLogic()

    def activate(self):
        self.followSelectedSegment()
        self.timer.start()

    def deactivate(self):
        self.timer.stop()
        self.unobserve()

    def cleanup(self):
        self.timer.stop()
        self.unobserve()
        self.logic().removeDimensionListener(self.onDimensionChanged)

    def status(self, text):
        self.statusLabel.text = text

    def dimension(self):
        """2 (msa_2d, this slice) or 3 (msa, propagate): the shared logic's mode."""
        return 2 if self.logic().dimension == 2 else 3

    def sourceVolume(self):
        node = self.scriptedEffect.parameterSetNode()
        return node.GetSourceVolumeNode() if hasattr(node, "GetSourceVolumeNode") else node.GetMasterVolumeNode()

    def selected(self):
        """(segmentation node, segment id) being edited, or (None, None)."""
        node = self.scriptedEffect.parameterSetNode()
        if node is None or node.GetSegmentationNode() is None or not node.GetSelectedSegmentID():
            return None, None
        return node.GetSegmentationNode(), node.GetSelectedSegmentID()

    # -- prompt nodes ------------------------------------------------------------------------

    def followSelectedSegment(self, create=False):
        """Observe the selected segment's prompt nodes; `create` them on the first click or box
        (merely selecting a segment adds nothing to the scene)."""
        segmentation, segmentId = self.selected()
        key = (segmentation.GetID(), segmentId) if segmentation is not None else None
        if key == self.observed and (self.nodes is not None or not create):
            return
        self.unobserve()
        self.nodes = prompt_nodes(segmentation, segmentId, create=create) if key is not None else None
        self.observed = key  # also when none exist yet: mouse moves must not search the scene again
        if self.nodes is None:
            return
        # One callback per event: VTK hands Python observers the event's NAME, "NoEvent" for these
        # custom markups events, so one callback could not tell them apart.
        markups = slicer.vtkMRMLMarkupsNode
        handlers = ((markups.PointEndInteractionEvent, self.onPromptMoved),
                    (markups.PointAboutToBeRemovedEvent, self.onPromptAboutToBeRemoved),
                    (markups.PointRemovedEvent, self.onPromptRemoved))
        for node in self.nodes.nodes():
            for event, handler in handlers:
                self.observerTags.append((node, node.AddObserver(event, handler)))
        self.observed = key

    def unobserve(self):
        for node, tag in self.observerTags:
            node.RemoveObserver(tag)
        self.observerTags = []
        self.observed = None

    def promptsIdle(self):
        # "Reset clicks" removes points one by one: no request for each step.
        return self.nodes is None or resetting(self.nodes)

    @vtk.calldata_type(vtk.VTK_INT)
    def onPromptMoved(self, caller, event, callData=None):
        """A point or the box was dragged: send the prompts again. In 2D mode the request answers
        the slice of the point that moved (callData: its index, when the event carries one), or
        the box's own slice."""
        if not self.promptsIdle():
            self.request(edited_slice(self.sourceVolume(), caller, callData) if self.dimension() == 2 else None)

    @vtk.calldata_type(vtk.VTK_INT)
    def onPromptAboutToBeRemoved(self, caller, event, callData=None):
        """The index of a removed point names another point once it is gone: take its slice now."""
        if not self.promptsIdle():
            self.removedSlice = edited_slice(self.sourceVolume(), caller, callData) if callData is not None else None

    @vtk.calldata_type(vtk.VTK_INT)
    def onPromptRemoved(self, caller, event, callData=None):
        """A point was deleted: send the prompts again (2D: about the deleted point's slice)."""
        sliceK, self.removedSlice = self.removedSlice, None
        if not self.promptsIdle():
            self.request(sliceK if self.dimension() == 2 else None)

    # -- interaction -------------------------------------------------------------------------

    def markupsUnderMouse(self):
        """A prompt point or box handle under the mouse: let the markups widget drag it."""
        if self.nodes is None:
            return False
        for node in self.nodes.nodes():
            display = node.GetDisplayNode()
            if display is not None and node.GetDisplayVisibility() and display.HasActiveComponent():
                return True
        return False

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if viewWidget.className() != "qMRMLSliceWidget":
            return False
        if eventId in (vtk.vtkCommand.LeftButtonPressEvent, vtk.vtkCommand.RightButtonReleaseEvent):
            self.followSelectedSegment(create=True)
        else:
            self.followSelectedSegment()
        if self.nodes is None:
            return False
        xy = callerInteractor.GetEventPosition()

        if eventId == vtk.vtkCommand.LeftButtonPressEvent:
            if self.markupsUnderMouse():
                return False
            if callerInteractor.GetShiftKey():
                self.boxStart = (viewWidget, xy)
                return True
            self.addPoint(self.xyToRas(xy, viewWidget), positive=not callerInteractor.GetControlKey(), viewWidget=viewWidget)
            return True
        if eventId == vtk.vtkCommand.MouseMoveEvent and self.boxStart is not None:
            self.placeSliceBox(self.boxStart[0], self.boxStart[1], xy, final=False)
            return True
        if eventId == vtk.vtkCommand.LeftButtonReleaseEvent and self.boxStart is not None:
            start = self.boxStart
            self.boxStart = None
            self.placeSliceBox(start[0], start[1], xy, final=True)
            return True
        if eventId == vtk.vtkCommand.RightButtonPressEvent:
            self.rightPress = xy
            return False  # right drag still zooms
        if eventId == vtk.vtkCommand.RightButtonReleaseEvent and self.rightPress is not None:
            moved = abs(xy[0] - self.rightPress[0]) + abs(xy[1] - self.rightPress[1])
            self.rightPress = None
            if moved <= 2 and not self.markupsUnderMouse():
                self.addPoint(self.xyToRas(xy, viewWidget), positive=False, viewWidget=viewWidget)
                return True
            return False
        if eventId == vtk.vtkCommand.KeyPressEvent:
            key = (callerInteractor.GetKeySym() or "").lower()
            if key == "t":
                self.logic().dimension = 2 if self.dimension() == 3 else 3  # the panel and the buttons follow
                self.status(f"Mode: {'2D, this slice' if self.dimension() == 2 else '3D, propagate'}")
                return True
            if key == "p":
                self.onPropagate()
                return True
            if key == "c":
                self.onReset()
                return True
        return False

    def addPoint(self, ras, positive, viewWidget):
        """A click: the point is checked against the volume BEFORE it is stored (a point outside
        would go out with every later request of the segment)."""
        try:
            ijk = add_point(self.nodes, self.sourceVolume(), ras, positive)
        except MSAClientError as exc:
            self.status(f"{exc}: no point added")
            return
        sliceK = None
        if self.dimension() == 2:
            sliceK = ijk[2]
            self.warnIfViewCrossesSlices(viewWidget)
        self.request(sliceK)

    def placeSliceBox(self, viewWidget, startXy, endXy, final):
        """A box in the view's plane, one slice thick (shift + drag)."""
        if abs(endXy[0] - startXy[0]) < 2 or abs(endXy[1] - startXy[1]) < 2:
            return
        a = np.array(self.xyToRas(startXy, viewWidget))
        b = np.array(self.xyToRas(endXy, viewWidget))
        sliceToRas = viewWidget.sliceLogic().GetSliceNode().GetSliceToRAS()
        axes = np.array([[sliceToRas.GetElement(r, c) for c in range(3)] for r in range(3)])
        axes = axes / np.linalg.norm(axes, axis=0)
        size = (abs(float(np.dot(b - a, axes[:, 0]))), abs(float(np.dot(b - a, axes[:, 1]))),
                float(self.scriptedEffect.sliceSpacing(viewWidget)))
        set_box(self.nodes.box, (a + b) / 2, axes, size)
        if final:
            sliceK = None
            if self.dimension() == 2:
                sliceK = edited_slice(self.sourceVolume(), self.nodes.box)  # the box's own slice
                if sliceK is None:
                    self.status("The box misses the volume: draw it on the volume.")
                    return
            self.request(sliceK)

    def warnIfViewCrossesSlices(self, viewWidget):
        """msa_2d segments the volume's k slices; say so when this view cuts across them."""
        volume = self.sourceVolume()
        if volume is None:
            return
        kAxis = ijk_to_ras(volume)[:3, 2]
        sliceToRas = viewWidget.sliceLogic().GetSliceNode().GetSliceToRAS()
        normal = np.array([sliceToRas.GetElement(r, 2) for r in range(3)])
        cosine = abs(float(np.dot(kAxis, normal))) / (np.linalg.norm(kAxis) * np.linalg.norm(normal))
        if cosine < 0.99:
            self.status("Note: 2D mode segments the volume's own slices (k); this view cuts across them.")

    def onPlaceRoi(self):
        """A 3D box centred on the slice views' intersection, a third of the volume wide."""
        self.followSelectedSegment(create=True)
        volume = self.sourceVolume()
        if self.nodes is None or volume is None:
            self.status("Select a segment and a source volume first.")
            return
        bounds = [0.0] * 6
        volume.GetRASBounds(bounds)
        crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        center = list(crosshair.GetCrosshairRAS()) if crosshair is not None else \
            [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2]
        size = tuple((bounds[2 * a + 1] - bounds[2 * a]) / 3 for a in range(3))
        set_box(self.nodes.box, center, np.eye(3), size)
        self.status("Drag the box's handles around the structure; the segment updates when you let go.")
        self.request(None)

    def onPropagate(self):
        self.request(None, dimension=3)

    def onReset(self):
        self.followSelectedSegment()
        if self.nodes is not None:
            reset_prompts(self.nodes)
            self.status("Points and box removed; the segment is unchanged (undo restores earlier states).")

    # -- requests ----------------------------------------------------------------------------

    def request(self, sliceK, dimension=None, retried=False):
        """Prepares the request here (GUI thread) and hands it to the worker thread."""
        segmentation, segmentId = self.selected()
        volume = self.sourceVolume()
        if segmentation is None or volume is None or self.nodes is None:
            self.status("Select a segmentation, a segment and a source volume first.")
            return
        dimension = dimension or self.dimension()
        logic = self.logic()
        try:
            segmenter = logic.segmenter
            prompts = prompts_from_nodes(self.nodes)
            if prompts.empty():
                self.status("Left click inside the structure (or shift + drag a box).")
                return
            request = make_request(segmenter.images, volume, prompts, dimension, sliceK,
                                   text=logic.targetName(segmentation, segmentId))
        except MSAClientError as exc:
            self.status(str(exc))
            return
        context = PendingRequest(segmentation.GetID(), segmentId, volume.GetID(), request, sliceK, dimension, retried)
        logic.requests.submit(run_request, segmenter.client, segmenter.images, request, context=context)
        uploading = " (uploading the volume first)" if request.image.array is not None else ""
        ignored = f" (left out: {', '.join(request.ignored)})" if request.ignored else ""
        self.status(f"Asking {request.model}{uploading}...{ignored}")
        self.pending = True

    def onPoll(self):
        """Applies the newest answer on the GUI thread."""
        outcome = self.logic().requests.poll()
        if outcome is None:
            return
        self.pending = False
        pending = outcome.context
        if isinstance(outcome.error, ImageLost) and not pending.retried:
            # The server lost the volume (restarted with another studies folder, image deleted): the
            # id is forgotten, so preparing again copies the voxels and the worker uploads them.
            self.request(pending.sliceK, pending.dimension, retried=True)
            return
        if outcome.error is not None:
            if "unknown target" in str(outcome.error):  # the served adapters changed their names
                self.logic().info = None
            if not isinstance(outcome.error, MSAClientError):
                logging.error("MSA request failed", exc_info=outcome.error)
                self.status(f"Unexpected error: {outcome.error} (details in the Python console); segment unchanged")
            else:
                self.status(f"{outcome.error}; segment unchanged")
            return
        segmentation, selectedId = self.selected()
        volume = slicer.mrmlScene.GetNodeByID(pending.volumeId)
        if (segmentation is None or segmentation.GetID() != pending.segmentationId or selectedId != pending.segmentId
                or volume is None):
            self.status("Answer dropped: the selected segment changed while the server worked.")
            return
        request = pending.request
        try:
            report = apply_result(EffectTarget(self.scriptedEffect), volume, request, outcome.result)
        except MSAClientError as exc:
            self.status(str(exc))
            return
        self.logic().noteAnswer(outcome.result.params)
        change = (f"{len(report.changed_slices)} slices changed (+{report.added} / -{report.removed} voxels)"
                  if report.changed else "no change")
        ignored = f"; left out: {', '.join(request.ignored)}" if request.ignored else ""
        self.status(f"{request.model}: {outcome.result.status()}; {change}{ignored}")


@dataclass
class PendingRequest:
    """What the GUI thread needs when a request's answer comes back (or must be sent again)."""

    segmentationId: str
    segmentId: str
    volumeId: str
    request: object  # MSAExtensionLib.InferRequest
    sliceK: object  # int or None
    dimension: int
    retried: bool = False
