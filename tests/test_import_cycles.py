"""No import circles in the package, imports inside functions included (tests/import_graph.py reads
every import statement from the source; `python tests/import_graph.py` lists them and the cycles)."""

from import_graph import cycles, imports


def test_the_package_has_no_import_cycle():
    assert cycles(imports()) == []


def test_the_graph_sees_imports_inside_functions_and_finds_a_cycle(tmp_path):
    pkg = tmp_path / "blend"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from .a import y  # a circle closed inside a function\n")
    (pkg / "c.py").write_text("from . import a\n")
    edges = imports(tmp_path)
    assert ("ragkv.blend.b", "ragkv.blend.a", 2, True) in edges and (
        "ragkv.blend.c",
        "ragkv.blend.a",
        1,
        False,
    ) in edges
    assert cycles(edges) == [["ragkv.blend.a", "ragkv.blend.b"]]
