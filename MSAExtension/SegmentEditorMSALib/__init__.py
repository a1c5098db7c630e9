"""The Segment Editor effect "MSA" (registered by the MSAExtension module at start-up)."""

from SegmentEditorEffects.AbstractScriptedSegmentEditorEffect import *  # noqa: F401,F403

from .SegmentEditorEffect import *  # noqa: F401,F403
