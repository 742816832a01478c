"""The notebook plumbing of the book: dsv3.viz.show and setup_notebook, the notebook runner, the committed chapters.

Colab is simulated (a fake ``google.colab`` module in ``sys.modules``, ``subprocess.run`` recorded), so the Colab
branch of the first cell is tested without network or Colab.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import nbformat
import plotly.graph_objects as go
import plotly.io as pio
import pytest
import torch

import dsv3
from dsv3.viz import display as viz
from dsv3.viz import preface
from helpers import load_tool

ROOT = Path(__file__).resolve().parents[1]


run_notebook = load_tool("run_notebook", "book/_tools/run_notebook.py")
dsv3_site = load_tool("dsv3_site", "book/_ext/dsv3_site.py")


@pytest.fixture(autouse=True)
def _fresh_ids(monkeypatch):
    monkeypatch.setattr(viz, "_ids_seen", {})
    monkeypatch.setattr(pio.renderers, "default", pio.renderers.default)


@pytest.fixture
def fake_colab(monkeypatch):
    """``google.colab`` (with ``output.enable_custom_widget_manager``) present, ``subprocess.run`` recorded."""
    calls = {"pip": [], "widget_manager": 0}
    google, colab, output = (types.ModuleType(n) for n in ("google", "google.colab", "google.colab.output"))

    def enable_custom_widget_manager():
        calls["widget_manager"] += 1

    output.enable_custom_widget_manager = enable_custom_widget_manager
    colab.output, google.colab = output, colab
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.output", output)

    def run(cmd, check=False, **kwargs):
        calls["pip"].append(list(cmd))
        return types.SimpleNamespace(returncode=0)

    monkeypatch.setattr(viz.subprocess, "run", run)
    return calls


def small_figure(title: str = "demo") -> go.Figure:
    fig = viz.figure(title=title, height=300)
    fig.add_bar(x=["a", "b"], y=[1.0, 2.5], name="bars")
    fig.add_scatter(x=[0, 1], y=[0.25, 0.75], name="line")
    return fig


# --- show / mimebundle ------------------------------------------------------------------------------------------


def test_mimebundle_has_plotly_json_html_and_summary():
    fig = small_figure()
    bundle = viz.mimebundle(fig)
    assert set(bundle) == {viz.PLOTLY_MIMETYPE, "text/html", "text/plain"}
    plotly_json = bundle[viz.PLOTLY_MIMETYPE]
    assert plotly_json["data"] == json.loads(pio.to_json(fig, engine="json"))["data"]
    assert plotly_json["config"] == viz.PLOTLY_CONFIG
    assert bundle["text/plain"] == "<Figure 'demo' | 2 traces: bar, scatter>"
    html = bundle["text/html"]
    div_id = html.split('id="', 1)[1].split('"', 1)[0]
    assert div_id.startswith("dsv3-fig-") and html.count(div_id) == 2  # the div and the script that draws it
    assert "window.Plotly.newPlot" in html and "<script src" not in html  # drawn by the page's own plotly.js
    # a responsive plot takes its container's height: without one, resizing the window collapsed it to 32 px
    assert f'id="{div_id}" class="dsv3-plotly" style="width: 100%; height: 300px;"' in html
    assert "height: 450px" in viz.mimebundle(go.Figure())["text/html"]  # plotly's default height


def test_figure_ids_are_deterministic_and_unique_within_a_kernel():
    first = viz.mimebundle(small_figure())["text/html"]
    again = viz.mimebundle(small_figure())["text/html"]
    other = viz.mimebundle(small_figure("other"))["text/html"]
    id_of = lambda html: html.split('id="', 1)[1].split('"', 1)[0]  # noqa: E731
    assert id_of(again) == id_of(first) + "-2"  # same figure twice on one page: still two distinct divs
    assert id_of(other) != id_of(first)
    viz._ids_seen.clear()  # a fresh kernel (nbval, run_notebook.py) gives the same ids again
    assert viz.mimebundle(small_figure())["text/html"] == first


def test_html_cannot_be_closed_early_by_figure_text():
    html = viz.mimebundle(small_figure("</script><b>x</b>"))["text/html"]
    assert html.count("</script>") == 1 and "<\\/script>" in html


def test_summary_counts_frames_sliders_and_menus():
    fig = small_figure()
    fig.frames = [go.Frame(data=[go.Bar(y=[i, i])], name=str(i)) for i in range(3)]
    fig.update_layout(
        sliders=[dict(steps=[dict(args=[[str(i)]], method="animate") for i in range(3)])],
        updatemenus=[dict(type="buttons", buttons=[dict(label="play", method="animate", args=[None])])],
    )
    assert viz.summary(fig) == "<Figure 'demo' | 2 traces: bar, scatter | 3 frames | 1 slider | 1 menu>"
    assert viz.mimebundle(fig)[viz.PLOTLY_MIMETYPE]["frames"][2]["name"] == "2"


def test_show_displays_the_bundle_raw(monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, raw=False: shown.append((obj, raw)))
    monkeypatch.delenv("DSV3_PLOTLY_RENDERER", raising=False)
    viz.show(small_figure())
    ((bundle, raw),) = shown
    assert raw and set(bundle) == {viz.PLOTLY_MIMETYPE, "text/html", "text/plain"}


def test_show_on_colab_hands_over_to_plotlys_colab_renderer(fake_colab, monkeypatch):
    used = []
    monkeypatch.setattr(viz.pio, "show", lambda fig, renderer=None: used.append((fig, renderer)))
    monkeypatch.delenv("DSV3_PLOTLY_RENDERER", raising=False)
    viz.show(small_figure())
    assert [r for _, r in used] == ["colab"] and isinstance(used[0][0], go.Figure)


def test_show_rejects_what_is_not_a_figure():
    with pytest.raises(TypeError, match="go.Figure or a figure dict, got list"):
        viz.show([1, 2])


def test_theme_is_the_default_template():
    assert pio.templates.default == "dsv3"
    layout = go.Figure().layout
    assert layout.template.layout.paper_bgcolor == "rgba(0, 0, 0, 0)"  # transparent: readable in dark mode
    assert list(layout.template.layout.colorway) == viz.COLORWAY


def test_book_renderer_makes_fig_show_use_the_bundle():
    bundle = pio.renderers["dsv3"].to_mimebundle(small_figure().to_dict())
    assert bundle["text/plain"] == "<Figure 'demo' | 2 traces: bar, scatter>"


# --- setup_notebook (the first cell) --------------------------------------------------------------------------


def test_setup_on_cpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device, big = viz.setup_notebook(seed=3)
    assert (device, big) == ("cpu", False)
    first = torch.rand(3)
    viz.setup_notebook(seed=3)
    assert torch.equal(torch.rand(3), first)  # seeded
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and f"dsv3 {dsv3.__version__}" in out and "device cpu" in out
    assert pio.renderers.default == "dsv3"


def test_setup_on_gpu_sets_big(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Fake H100")
    setup = viz.setup_notebook()
    assert setup == viz.NotebookSetup(device="cuda", big=True)
    assert "device cuda (Fake H100)" in capsys.readouterr().out


def test_setup_device_can_be_forced(monkeypatch, capsys):
    """``run_notebook.py --device`` sets DSV3_DEVICE: cpu even with a GPU, cuda only with one, nothing else."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Fake H100")
    monkeypatch.setenv("DSV3_DEVICE", "cpu")
    assert viz.setup_notebook() == viz.NotebookSetup(device="cpu", big=False)
    monkeypatch.setenv("DSV3_DEVICE", "cuda")
    assert viz.setup_notebook() == viz.NotebookSetup(device="cuda", big=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="DSV3_DEVICE=cuda but torch sees no CUDA GPU"):
        viz.setup_notebook()
    monkeypatch.setenv("DSV3_DEVICE", "tpu")
    with pytest.raises(ValueError, match="DSV3_DEVICE='tpu'"):
        viz.setup_notebook()


def test_setup_on_colab_installs_only_missing_extras_and_enables_widgets(fake_colab, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device, big = viz.setup_notebook(extras=["plotly>=1", "dsv3-no-such-package>=2", "torch<1"])
    assert (device, big) == ("cpu", False)
    assert fake_colab["pip"] == [[sys.executable, "-m", "pip", "install", "-q", "dsv3-no-such-package>=2", "torch<1"]]
    assert fake_colab["widget_manager"] == 1
    assert pio.renderers.default == "colab"
    assert "| Colab" in capsys.readouterr().out


def test_setup_on_colab_with_nothing_missing_runs_no_pip(fake_colab, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    viz.setup_notebook(extras=["plotly>=1"])
    assert fake_colab["pip"] == [] and fake_colab["widget_manager"] == 1


def test_setup_off_colab_never_installs(monkeypatch):
    monkeypatch.setattr(viz.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run outside Colab"))
    with pytest.raises(ModuleNotFoundError, match="pip install 'dsv3-no-such-package>=2'"):
        viz.setup_notebook(extras=["dsv3-no-such-package>=2"])


# --- the preface's package map ---------------------------------------------------------------------------------


def test_first_sentence_of_docstrings(tmp_path):
    cases = [  # (module source, the first sentence of its docstring)
        (
            '"""Multi-head Latent Attention (paper Sec. 2.1.1, Eq. 1-11). Taught in Chapter 2."""',
            "Multi-head Latent Attention (paper Sec. 2.1.1, Eq. 1-11).",
        ),
        (
            '"""The ``ModelConfig``: fields\nof the released config.\n\nDetails."""',
            "The `ModelConfig`: fields of the released config.",
        ),
        ("x = 1", ""),
    ]
    for i, (source, expected) in enumerate(cases):
        path = tmp_path / f"m{i}.py"
        path.write_text(source)
        assert preface.first_sentence(path) == expected


def test_package_map_lists_the_installed_modules_in_reading_order():
    rows = dict(preface.package_map())
    root = Path(dsv3.__file__).parent
    assert "config.py" in rows and "layers/mla.py" in rows and "viz/" in rows
    assert all((root / name).exists() for name in rows)  # only modules that exist
    order = [name for name, _ in preface.package_map()]
    assert order.index("config.py") < order.index("layers/mla.py") < order.index("model.py")
    table = preface.module_table()
    assert table.count("\n") == len(rows) + 1 and "| `dsv3/config.py` |" in table


def test_chapter_map_links_only_existing_modules():
    fig = preface.chapter_map()
    sankey = fig.data[0]
    labels = list(sankey.node.label)
    existing = {f"dsv3/{name}" for name, _ in preface.package_map()}
    modules = [label for label in labels if label.startswith("dsv3/")]
    assert modules and set(modules) <= existing
    assert len(sankey.link.source) == len(sankey.link.target) == len(sankey.link.value)
    assert max(max(sankey.link.source), max(sankey.link.target)) < len(labels)


# --- run_notebook.py ------------------------------------------------------------------------------------------


def _volatile_notebook():
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"name": "venv-3.11", "display_name": "My venv", "language": "python"},
        "language_info": {"name": "python", "version": "3.11.7"},
        "colab": {"provenance": []},
        "widgets": {
            run_notebook.WIDGET_STATE: {
                "state": {
                    "3f2a": {"model_name": "IntSliderModel", "state": {"layout": "IPY_MODEL_9c1d"}},
                    "9c1d": {"model_name": "LayoutModel", "state": {}},
                },
                "version_major": 2,
                "version_minor": 0,
            }
        },
    }
    code = nbformat.v4.new_code_cell(
        "# NBVAL_IGNORE_OUTPUT\nprint(1)",
        execution_count=1,
        outputs=[
            nbformat.v4.new_output(
                "display_data",
                data={
                    "application/vnd.jupyter.widget-view+json": {"model_id": "3f2a"},
                    "text/plain": "IntSlider(value=0)",
                },
            )
        ],
    )
    code.metadata = {
        "execution": {"iopub.execute_input": "2025-01-01T00:00:00Z"},
        "collapsed": False,
        "tags": ["keep"],
        "colab": {"base_uri": "x"},
    }
    nb.cells = [nbformat.v4.new_markdown_cell("# T", id="title"), code]
    code.id = "code"
    return nb


def test_strip_removes_volatile_metadata_and_keeps_outputs():
    stripped = run_notebook.strip(_volatile_notebook(), "99_demo")
    assert set(stripped.metadata) == {"kernelspec", "language_info", "widgets"}
    assert stripped.metadata.kernelspec == run_notebook.KERNELSPEC
    assert "version" not in stripped.metadata.language_info
    code = stripped.cells[1]
    assert code.metadata == {"tags": ["keep"]} and code.execution_count == 1
    assert code.outputs[0]["data"]["text/plain"] == "IntSlider(value=0)"
    state = stripped.metadata.widgets[run_notebook.WIDGET_STATE]["state"]
    new_slider, new_layout = list(state)
    assert "3f2a" not in json.dumps(stripped) and "9c1d" not in json.dumps(stripped)
    assert state[new_slider]["state"]["layout"] == f"IPY_MODEL_{new_layout}"  # references renamed consistently
    assert code.outputs[0]["data"]["application/vnd.jupyter.widget-view+json"]["model_id"] == new_slider
    again = run_notebook.strip(_volatile_notebook(), "99_demo")
    assert nbformat.writes(again) == nbformat.writes(stripped)  # deterministic
    assert nbformat.writes(run_notebook.strip(stripped, "99_demo")) == nbformat.writes(stripped)  # idempotent
    nbformat.validate(stripped)


def test_check_reports_what_is_wrong(tmp_path):
    path = tmp_path / "99_demo.ipynb"
    nb = _volatile_notebook()
    nb.cells[1].execution_count = 4
    nb.cells[1].outputs.append(nbformat.v4.new_output("error", ename="ValueError", evalue="x", traceback=[]))
    nb.cells[1].source = "print(1)"
    nbformat.write(nb, path)
    found = "\n".join(run_notebook.problems(path))
    assert "volatile metadata not stripped" in found
    assert "execution counts [4] are not 1..1" in found
    assert "cell 1 has an error output (ValueError)" in found
    assert "NBVAL_IGNORE_OUTPUT" in found
    assert run_notebook.main(["--check", str(path)]) == 1


@pytest.mark.slow
def test_execute_runs_in_the_fixed_environment_and_stores_widget_state(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("DSV3_PLOTLY_RENDERER", "browser")
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(
                "# NBVAL_IGNORE_OUTPUT\nimport os\n"
                "print(os.environ['PYTHONHASHSEED'], repr(os.environ['CUDA_VISIBLE_DEVICES']),"
                " os.environ['OMP_NUM_THREADS'], 'DSV3_PLOTLY_RENDERER' in os.environ)"
            ),
            nbformat.v4.new_code_cell("import ipywidgets as w\nw.IntSlider(value=7, description='n')"),
            nbformat.v4.new_code_cell(f"import os\nprint(os.getcwd() == {str(tmp_path)!r})"),
        ]
    )
    path = tmp_path / "99_probe.ipynb"
    nbformat.write(nb, path)
    seconds = run_notebook.execute(path, timeout=120)
    assert 0 < seconds < 120
    assert run_notebook.problems(path) == []
    done = nbformat.read(path, as_version=4)
    assert done.cells[0].outputs[0]["text"] == "0 '' 2 False\n"  # env fixed for the kernel
    assert done.cells[2].outputs[0]["text"] == "True\n"  # kernel runs in the notebook's folder, like nbval
    state = done.metadata.widgets[run_notebook.WIDGET_STATE]["state"]
    sliders = [s for s in state.values() if s["model_name"] == "IntSliderModel"]
    assert len(sliders) == 1 and sliders[0]["state"]["value"] == 7
    view = done.cells[1].outputs[0]["data"]["application/vnd.jupyter.widget-view+json"]
    assert view["model_id"] in state
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"  # our own environment untouched


def test_cuda_environment_keeps_the_gpu_and_compiles_triton():
    cpu = run_notebook.apply_env({"CUDA_VISIBLE_DEVICES": "0"})
    assert cpu["CUDA_VISIBLE_DEVICES"] == "" and cpu["DSV3_DEVICE"] == "cpu" and cpu["TRITON_INTERPRET"] == "1"
    cuda = run_notebook.apply_env({"CUDA_VISIBLE_DEVICES": "0"}, device="cuda")
    assert cuda["CUDA_VISIBLE_DEVICES"] == "0" and cuda["DSV3_DEVICE"] == "cuda" and "TRITON_INTERPRET" not in cuda
    assert cuda["PYTHONHASHSEED"] == "0" and cuda["OMP_NUM_THREADS"] == "2"
    with pytest.raises(ValueError, match="device 'gpu'"):
        run_notebook.apply_env({}, device="gpu")


def test_timing_file_and_table(tmp_path):
    path = tmp_path / "timings.json"
    names = [p.stem for p in run_notebook.chapters()]
    table = run_notebook.timing_markdown(path)
    assert table.count("not measured yet") == 2 * (len(names) + 1)  # every chapter and the total, both devices
    for i, name in enumerate(names):
        run_notebook.record_timing(name, 10.04 + i, "cpu", "Fake CPU, cpu (2 threads)", path)
    run_notebook.record_timing(names[0], 3.0, "cuda", "cuda (Fake H100)", path)
    run_notebook.record_timing(names[0], 2.5, "cuda", "cuda (Fake H100)", path)  # a re-run replaces the entry
    data = json.loads(path.read_text())
    assert data["cuda"] == {names[0]: {"seconds": 2.5, "machine": "cuda (Fake H100)"}}
    table = run_notebook.timing_markdown(path)
    lines = table.splitlines()
    assert lines[2] == f"| [{names[0]}]({names[0]}.ipynb) | 10 s | 2 s |"
    total = sum(round(10.04 + i, 1) for i in range(len(names)))
    expected = f"{total:.0f} s" if total < 120 else f"{total / 60:.1f} min"
    assert f"| **the whole book** | {expected} | not measured yet |" in lines
    assert lines[-1] == "CPU: measured on Fake CPU, cpu (2 threads). GPU: measured on cuda (Fake H100)."


def test_machine_reads_the_device_line_of_the_setup_cell():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("setup")])
    nb.cells[0].outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="python 3.11 | torch 2.13 | device cuda (NVIDIA H100)\n")
    ]
    assert run_notebook.machine(nb, "cuda") == "cuda (NVIDIA H100)"
    nb.cells[0].outputs[0]["text"] = "python 3.11 | device cpu (2 threads)\n"
    assert run_notebook.machine(nb, "cpu").endswith("cpu (2 threads)")


# A short training run (the book's chaotic case: sign-based bias updates) and a matmul long enough for MKL's
# blocking to matter; it prints their bits.
_FLOAT_PROBE = """
import hashlib, torch
from dsv3 import ModelConfig
from dsv3.train import TrainConfig, train
torch.manual_seed(0)
a, b = torch.randn(64, 3000), torch.randn(3000, 96)
r = train(ModelConfig.tiny(), TrainConfig(steps=4, batch_size=2, seq_len=32, warmup_steps=1, eval_every=0,
                                          save_every=0, progress=False, seed=0))
parts = [(a @ b).numpy().tobytes(), repr([h["loss"] for h in r.history]).encode(),
         repr(r.history[-1]["biases"]).encode()]
print(hashlib.sha256(b"".join(parts)).hexdigest())
"""


@pytest.mark.slow
def test_notebook_environment_computes_the_same_bits_on_a_cpu_without_avx512():
    """The committed outputs must be reproduced by CI machines whose CPUs differ from the one that made them.
    ``MKL_ENABLE_INSTRUCTIONS=AVX2`` makes MKL behave as on a CPU without AVX-512; in the notebook environment
    (pinned ATen and MKL code paths) the bits must not change."""
    import subprocess

    env = run_notebook.apply_env(dict(os.environ))
    runs = [
        subprocess.run([sys.executable, "-c", _FLOAT_PROBE], env=e, capture_output=True, text=True, timeout=300)
        for e in (env, dict(env, MKL_ENABLE_INSTRUCTIONS="AVX2"))
    ]
    assert all(r.returncode == 0 for r in runs), [r.stderr[-2000:] for r in runs]
    assert runs[0].stdout == runs[1].stdout


# --- the committed chapters -----------------------------------------------------------------------------------

CHAPTERS = sorted((ROOT / "book").glob(run_notebook.CHAPTER_GLOB))


def test_the_book_has_a_preface():
    assert ROOT / "book" / "00_preface.ipynb" in CHAPTERS


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_committed_chapter_is_executed_and_stripped(path):
    assert run_notebook.problems(path) == []


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_committed_chapter_first_cell_is_the_standard_setup(path):
    nb = nbformat.read(path, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert first.source.splitlines()[0] == "# NBVAL_IGNORE_OUTPUT"
    assert '"google.colab" in sys.modules' in first.source and "setup_notebook(" in first.source


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_figures_in_committed_chapters_come_from_dsv3_viz_show(path):
    """Every plotly output carries the HTML twin that the site draws; a bare plotly mimetype would vanish."""
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if viz.PLOTLY_MIMETYPE in data:
                assert 'class="dsv3-plotly"' in data.get("text/html", ""), f"{path.name} cell {i}: use dsv3.viz.show"


# --- the site's notebook reader -------------------------------------------------------------------------------


def test_site_reader_drops_plotly_json_only_where_html_is_there():
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(
                "x",
                outputs=[
                    nbformat.v4.new_output("display_data", data=viz.mimebundle(small_figure())),
                    nbformat.v4.new_output(
                        "display_data", data={viz.PLOTLY_MIMETYPE: {"data": []}, "text/plain": "Figure"}
                    ),
                ],
            )
        ]
    )
    read = dsv3_site.read_notebook(nbformat.writes(nb))
    first, second = read.cells[0].outputs
    assert set(first.data) == {"text/html", "text/plain"}
    assert viz.PLOTLY_MIMETYPE in second.data  # kept, so myst-nb warns and the -W build fails
