"""The extension's files: what the CMake files list exists (and nothing is left out), the Qt-free
package imports with slicer-core alone, the module and the effect compile, the UI names the widgets
the module uses, and the in-Slicer unit tests (Testing/Python) pass here too."""

from __future__ import annotations

import ast
import os
import py_compile
import re
import subprocess
import sys
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXT = REPO / "MSAExtension"


def cmake_list(text: str, name: str) -> list[str]:
    """The entries of `set(NAME ...)` in a CMake file, ${MODULE_NAME} expanded."""
    block = re.search(rf"set\({name}\s+(.*?)\)", text, re.S)
    assert block, f"no set({name} ...)"
    module = re.search(r"set\(MODULE_NAME\s+(\S+)\)", text).group(1)
    return [entry.replace("${MODULE_NAME}", module) for entry in block.group(1).split()]


def test_root_cmake_declares_the_extension():
    text = (REPO / "CMakeLists.txt").read_text()
    assert re.search(r"project\(MSAExtension\)", text)
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS",
                "EXTENSION_CONTRIBUTORS"):
        assert re.search(rf'set\({key} "[^"]+"\)', text), key
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text
    assert 'set(EXTENSION_DEPENDS "NA")' in text
    assert "find_package(Slicer REQUIRED)" in text
    assert "add_subdirectory(MSAExtension)" in text
    assert "${Slicer_EXTENSION_CPACK}" in text


def test_every_listed_script_and_resource_exists_and_none_is_missing():
    text = (EXT / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule(" in text
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES")
    for entry in scripts + resources:
        assert (EXT / entry).is_file(), f"{entry} is listed in MSAExtension/CMakeLists.txt but does not exist"
    shipped = {p.relative_to(EXT).as_posix() for p in EXT.rglob("*.py") if "Testing" not in p.parts}
    assert shipped == set(scripts), f"not listed: {shipped - set(scripts)}; listed, absent: {set(scripts) - shipped}"
    for resource in ("png", "ui"):
        found = {p.relative_to(EXT).as_posix() for p in EXT.rglob(f"*.{resource}")}
        assert found <= set(resources), f"resources not listed: {found - set(resources)}"
    testing = (EXT / "Testing" / "Python" / "CMakeLists.txt").read_text()
    for script in re.findall(r"SCRIPT\s+(\S+)\)", testing):
        assert (EXT / "Testing" / "Python" / script).is_file(), script
    assert (EXT / "Testing" / "CMakeLists.txt").read_text().strip() == "add_subdirectory(Python)"


def test_ctest_registers_no_test_that_needs_a_server():
    """`ctest` in an extension build runs what the CMake files register: the generic module tests
    (WITH_GENERIC_TESTS: the module loads, its widget builds) and Testing/Python's scripts, which
    test_in_slicer_unit_tests_pass_headless runs here without any server. The module's self-test
    (MSAExtension.py) needs a running MSA server: users run it from Slicer's Python console."""
    registered = []
    for cmake in sorted(EXT.rglob("CMakeLists.txt")):
        text = "\n".join(line.split("#", 1)[0] for line in cmake.read_text().splitlines())
        for script in re.findall(r"slicer_add_python_(?:unit)?test\(\s*SCRIPT\s+([^\s)]+)", text):
            registered.append((cmake.parent.relative_to(EXT).as_posix(), script))
    assert registered == [("Testing/Python", "MSAExtensionLibTest.py")], registered
    source = (EXT / "Testing" / "Python" / "MSAExtensionLibTest.py").read_text()
    assert "MSAClient(" not in source and "Segmenter(" not in source and "http" not in source


def test_icon_is_a_png():
    data = (EXT / "Resources" / "Icons" / "MSAExtension.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (128, 128)


def test_lib_imports_with_slicer_core_alone_and_no_qt():
    """In a fresh interpreter: no Qt module, no monailabel, no requests get imported."""
    code = ("import sys; import MSAExtensionLib as lib; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0].lower() in "
            "('qt', 'ctk', 'pythonqt', 'monailabel', 'requests', 'torch', 'msa')); "
            "print(len(lib.__all__), bad)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(EXT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=EXT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    count, bad = out.stdout.strip().split(" ", 1)
    assert int(count) > 20 and bad == "[]", out.stdout


def test_module_and_effect_compile(tmp_path):
    for path in [EXT / "MSAExtension.py", *sorted((EXT / "SegmentEditorMSALib").glob("*.py")),
                 *sorted((EXT / "MSAExtensionLib").glob("*.py"))]:
        py_compile.compile(str(path), cfile=str(tmp_path / (path.name + "c")), doraise=True)


def test_module_defines_the_slicer_classes_and_registers_the_effect():
    tree = ast.parse((EXT / "MSAExtension.py").read_text())
    classes = {node.name: [b.id if isinstance(b, ast.Name) else getattr(b, "attr", None) for b in node.bases]
               for node in tree.body if isinstance(node, ast.ClassDef)}
    assert classes["MSAExtension"] == ["ScriptedLoadableModule"]
    assert classes["MSAExtensionWidget"][0] == "ScriptedLoadableModuleWidget"
    assert classes["MSAExtensionLogic"] == ["ScriptedLoadableModuleLogic"]
    assert classes["MSAExtensionTest"] == ["ScriptedLoadableModuleTest"]
    source = (EXT / "MSAExtension.py").read_text()
    assert 'slicer.app.connect("startupCompleted()", registerEffect)' in source
    assert '"SegmentEditorMSALib", "SegmentEditorEffect.py"' in source
    effect = ast.parse((EXT / "SegmentEditorMSALib" / "SegmentEditorEffect.py").read_text())
    names = {node.name for node in effect.body if isinstance(node, ast.ClassDef)}
    assert "SegmentEditorEffect" in names  # the class name setPythonSource looks for


def test_ui_has_every_widget_the_module_uses():
    widgets = {w.get("name") for w in ET.parse(EXT / "Resources" / "UI" / "MSAExtension.ui").iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", (EXT / "MSAExtension.py").read_text()))
    assert used and used <= widgets, f"used but not in the .ui: {used - widgets}"


def test_in_slicer_unit_tests_pass_headless():
    sys.path.insert(0, str(EXT / "Testing" / "Python"))
    try:
        import MSAExtensionLibTest
    finally:
        sys.path.remove(str(EXT / "Testing" / "Python"))
    suite = unittest.defaultTestLoader.loadTestsFromModule(MSAExtensionLibTest)
    result = unittest.TextTestRunner(verbosity=0).run(suite)
    assert result.testsRun == 4 and result.wasSuccessful() and not result.skipped, (result.failures, result.errors)
