"""Plugin discovery, ordering, failure isolation, allow/block lists, misspelled hooks and duplicate names.

Third-party plugins are simulated by real distributions: a ``*.dist-info`` folder (METADATA and
``entry_points.txt``) next to the plugin's module, on ``sys.path``. ``importlib.metadata`` finds them
exactly as it finds a pip-installed distribution, so the loader's real discovery path is exercised.
(``test_cli.py`` and ``test_example_plugin``, below, also pip-install distributions for real.)
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import shutil
import sys
import textwrap
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from hf_lowmem import spec
from hf_lowmem.context import LowMemContext, resolve_selection
from hf_lowmem.errors import PluginError, PluginLoadError
from hf_lowmem.plugins import ESSENTIAL, FIRST_PARTY_DIST, get_plugin_host, load_plugins, reset_plugin_host

ROOT = Path(__file__).resolve().parents[1]


def first_party_entry_points() -> dict[str, str]:
    """The entry points hf-lowmem's own pyproject.toml declares (name -> module)."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return dict(data["project"]["entry-points"]["hf_lowmem"])


def make_dist(site: Path, dist: str, modules: dict[str, str], entry_points: dict[str, str], version: str = "1.0") -> Path:
    """Write a distribution into the folder ``site`` the way pip lays out an installed one: its
    modules (name -> source) and a dist-info with METADATA and ``[hf_lowmem]`` entry points."""
    site.mkdir(parents=True, exist_ok=True)
    for mod, source in modules.items():
        (site / f"{mod}.py").write_text(textwrap.dedent(source))
    info = site / f"{re.sub(r'[-_.]+', '_', dist)}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    eps = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{spec.ENTRY_POINT_GROUP}]\n{eps}\n")
    return site


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path for fake distributions; their modules are forgotten afterwards."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    for var in ("HF_LOWMEM_PLUGINS", "HF_LOWMEM_DISABLE_PLUGINS", "HF_LOWMEM_STRICT_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    before = set(sys.modules)
    yield folder
    for name in set(sys.modules) - before:
        mod = sys.modules.get(name)
        if getattr(mod, "__file__", None) and str(folder) in str(mod.__file__):
            del sys.modules[name]
    importlib.invalidate_caches()
    reset_plugin_host()


def optimizer_plugin(name: str, marker: str | None = None) -> str:
    """Source of a plugin module registering optimizer ``name`` (it records the ``hf_lowmem_validate`` event in
    ``CALLS``); if ``marker`` is given, its optimizer is that string (to observe who is asked)."""
    src = f"""
        from hf_lowmem import hookimpl, Plugin
        CALLS = []

        class Opt(Plugin):
            name, kind, help = {name!r}, "optimizer", "test plugin"

            def create_optimizer(self, ctx, model, trainer):
                return {marker!r}

        @hookimpl
        def hf_lowmem_register(register):
            register(Opt())

        @hookimpl
        def hf_lowmem_validate(ctx):
            CALLS.append({name!r})
        """
    return src


def ctx_for(host, **request):
    req = {k: list(v) for k, v in request.items()}
    sel = resolve_selection(host, req, {}, "single")
    return LowMemContext(args=SimpleNamespace(learning_rate=1e-3), host=host, selection=sel)


# ---- discovery ------------------------------------------------------------------------------------------
def test_first_party_plugins_are_discovered_through_entry_points(site):
    host = load_plugins()
    declared = first_party_entry_points()
    assert declared, "pyproject.toml declares no hf_lowmem entry points"
    first_party_failures = [str(f) for f in host.failures if f.distribution == FIRST_PARTY_DIST]
    assert not first_party_failures, first_party_failures
    loaded = {name for name, dist in host.loaded.items() if dist == FIRST_PARTY_DIST}
    assert loaded == set(declared)
    adamw = host.registry["adamw"]
    assert (adamw.kind, adamw.distribution, adamw.essential) == ("optimizer", FIRST_PARTY_DIST, True)
    assert adamw.version == importlib.metadata.version(FIRST_PARTY_DIST)
    assert host.registry.owner("adamw") == "core"


def test_every_registered_plugin_has_help_and_a_known_owner(site):
    host = load_plugins()
    assert len(host.registry) >= 1
    for info in host.registry:
        assert info.help.strip(), f"plugin {info.name} has no help line"
        assert host.registry.owner(info.name) in host.loaded
        assert info.name == info.name.lower() and " " not in info.name


def test_loading_twice_gives_a_clean_identical_state(site):
    a, b = load_plugins(), load_plugins()
    assert a is not b and a.pm is not b.pm
    assert list(a.loaded) == list(b.loaded)
    assert a.registry.names() == b.registry.names()


def test_the_process_wide_host_is_loaded_once_and_can_be_reset(site):
    reset_plugin_host()
    h1 = get_plugin_host()
    assert get_plugin_host() is h1
    reset_plugin_host()
    assert get_plugin_host() is not h1


def test_core_never_imports_first_party_plugins_directly():
    for path in (ROOT / "hf_lowmem").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import)\s+hf_lowmem_plugins", text, re.M), path


def test_every_hook_and_plugin_method_is_documented():
    hooks = [(n, f) for n, f in vars(spec).items() if n.startswith("hf_lowmem_") and callable(f)]
    methods = [(n, f) for n, f in vars(spec.Plugin).items() if callable(f) and not n.startswith("_")
               and n in ("validate", "prepare_model", "callbacks", "create_engine", "optimizer_cls_and_kwargs",
                         "create_optimizer", "compute_loss", "before_save", "plan_variants", "plan_setup",
                         "memory_model")]
    assert len(hooks) >= 5 and len(methods) == 11
    for name, fn in hooks + methods:
        doc = inspect.getdoc(fn) or ""
        assert len(doc) > 80, f"{name} has no reference docstring"
        for param in inspect.signature(fn).parameters:
            assert param == "self" or f":param {param}:" in doc, f"{name} does not document {param}"
        assert ":return:" in doc, f"{name} does not document its return contract"
        assert name == "hf_lowmem_register" or name in spec.__doc__, f"{name} missing from the call-order overview"


# ---- ordering -------------------------------------------------------------------------------------------
def test_third_party_modules_hear_events_before_first_party(site):
    make_dist(site, "zeta-plugins", {"zeta_mod": """
        from hf_lowmem import hookimpl

        @hookimpl
        def hf_lowmem_callbacks(ctx):
            return ["zeta's callback"]
        """}, {"zeta": "zeta_mod"})
    host = load_plugins()
    order = [impl.plugin_name for impl in reversed(host.pm.hook.hf_lowmem_callbacks.get_hookimpls())]
    assert order.index("zeta") < order.index("telemetry")
    ctx = ctx_for(host)
    ctx.args.lowmem_telemetry = False
    assert host.callbacks(ctx=ctx) == ["zeta's callback"]  # a module that registers no plugin hears it too


def test_only_the_selected_plugin_is_asked_for_what_its_kind_provides(site):
    make_dist(site, "zeta-plugins", {"zeta_mod": optimizer_plugin("zeta-opt", marker="from zeta")},
              {"zeta": "zeta_mod"})
    host = load_plugins()
    asked = []

    def recorder(name):
        return lambda ctx, model, trainer: asked.append(name) or name

    for name in host.registry.names("optimizer"):  # record every optimizer plugin that is asked
        host.registry[name].create_optimizer = recorder(name)
    assert host.create_optimizer(ctx=ctx_for(host, optimizer=["zeta-opt"]), model=None, trainer=None) == "zeta-opt"
    assert host.create_optimizer(ctx=ctx_for(host), model=None, trainer=None) is None  # none selected: the Trainer's
    assert asked == ["zeta-opt"]
    # a module-level hook of the 0.1 API that became a plugin method is refused with the way to migrate
    make_dist(site, "old-dist", {"old_mod": """
        from hf_lowmem import hookimpl

        @hookimpl
        def hf_lowmem_create_optimizer(ctx, model, trainer):
            return None
        """}, {"old": "old_mod"})
    failure = next(f for f in load_plugins().failures if f.entry_point == "old")
    assert "not an event any more" in failure.error and "'optimizer_cls_and_kwargs or create_optimizer'" in failure.error


def test_registration_order_is_deterministic(site):
    # created in the "wrong" order on purpose: the loader sorts, filesystem order does not matter
    make_dist(site, "zeta-plugins", {"zeta_mod": optimizer_plugin("zeta-opt")}, {"zeta": "zeta_mod"})
    make_dist(site, "alpha-plugins", {"alpha_b": optimizer_plugin("alpha-b"), "alpha_a": optimizer_plugin("alpha-a")},
              {"b_second": "alpha_b", "a_first": "alpha_a"})
    host = load_plugins()
    order = list(host.loaded)
    first_party = [n for n in order if host.loaded[n] == FIRST_PARTY_DIST]
    assert order[: len(first_party)] == sorted(first_party)  # hf-lowmem's own first, by name
    assert order[len(first_party):] == ["a_first", "b_second", "zeta"]  # then by distribution, then name
    validate_calls = [i.plugin_name for i in reversed(host.pm.hook.hf_lowmem_validate.get_hookimpls())]
    assert validate_calls[:3] == ["zeta", "b_second", "a_first"]  # last registered runs first
    assert list(load_plugins().loaded) == order


def test_extra_plugins_register_after_entry_points(site):
    mod = SimpleNamespace(__name__="my_extra")
    host = load_plugins(extra_plugins=[("extra", mod)])
    assert list(host.loaded)[-1] == "extra"
    assert host.loaded["extra"] == "my_extra"


# ---- failure isolation ------------------------------------------------------------------------------------
BROKEN_AT_IMPORT = """
    raise RuntimeError("boom: this plugin is broken at import")
"""


def test_a_plugin_that_fails_to_import_is_reported_and_the_others_keep_working(site, caplog):
    make_dist(site, "broken-dist", {"broken_mod": BROKEN_AT_IMPORT}, {"broken": "broken_mod"}, version="6.6.6")
    make_dist(site, "good-dist", {"good_mod": optimizer_plugin("good-opt")}, {"good": "good_mod"})
    with caplog.at_level(logging.WARNING, logger="hf_lowmem"):
        host = load_plugins()
    assert len(host.failures) == 1, [str(f) for f in host.failures]
    f = host.failures[0]
    assert (f.entry_point, f.distribution) == ("broken", "broken-dist")
    assert f.error == "RuntimeError: boom: this plugin is broken at import"
    assert "Traceback" in f.traceback and "broken_mod.py" in f.traceback and "boom" in f.traceback
    assert "'broken' from distribution 'broken-dist'" in str(f)
    assert "broken" not in host.loaded
    assert "good" in host.loaded and "good-opt" in host.registry and "adamw" in host.registry
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "broken-dist" in warning and "boom" in warning and "HF_LOWMEM_DISABLE_PLUGINS=broken" in warning
    # the survivors work end to end: select one and run its hooks
    host.validate(ctx=ctx_for(host, optimizer=["good-opt"]))
    assert sys.modules["good_mod"].CALLS == ["good-opt"]


@pytest.mark.parametrize("source,target,error", [
    ("import this_package_does_not_exist_anywhere\n", "mod", "ModuleNotFoundError"),
    ("x = 1\n", "mod:no_such_attribute", "AttributeError"),
    ("import sys\nsys.exit('a plugin that exits')\n", "mod", "SystemExit"),
    ("def f(:\n", "mod", "SyntaxError"),
])
def test_any_import_failure_is_isolated(site, source, target, error):
    name = f"bad_{error.lower()}"
    make_dist(site, f"{name}-dist", {name: source}, {name: target.replace("mod", name)})
    host = load_plugins()
    assert [(f.entry_point, f.distribution) for f in host.failures] == [(name, f"{name}-dist")]
    assert host.failures[0].error.startswith(error)
    assert "adamw" in host.registry


def test_strict_mode_raises_plugin_load_error(site, monkeypatch):
    make_dist(site, "broken-dist", {"broken_mod": BROKEN_AT_IMPORT}, {"broken": "broken_mod"})
    with pytest.raises(PluginLoadError, match=r"'broken' from distribution 'broken-dist'.*boom") as e:
        load_plugins(strict=True)
    assert isinstance(e.value.__cause__, RuntimeError)
    monkeypatch.setenv("HF_LOWMEM_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="HF_LOWMEM_STRICT_PLUGINS"):
        load_plugins()
    monkeypatch.setenv("HF_LOWMEM_STRICT_PLUGINS", "0")
    assert load_plugins().failures


def test_strict_mode_from_training_arguments(site, tmp_path):
    from hf_lowmem import LowMemTrainingArguments

    make_dist(site, "broken-dist", {"broken_mod": BROKEN_AT_IMPORT}, {"broken": "broken_mod"})
    with pytest.raises(PluginLoadError, match="broken-dist"):
        LowMemTrainingArguments(output_dir=str(tmp_path), use_cpu=True, lowmem_strict_plugins=True)
    reset_plugin_host()
    args = LowMemTrainingArguments(output_dir=str(tmp_path), use_cpu=True, lowmem_optimizer="adamw")
    assert args.lowmem_optimizer == "adamw"  # not strict: the broken plugin is only reported


def test_a_plugin_whose_register_hook_fails_is_rolled_back(site):
    make_dist(site, "half-dist", {"half_mod": """
        from hf_lowmem import hookimpl, PluginInfo

        @hookimpl
        def hf_lowmem_register(register):
            register(PluginInfo(name="half-a", kind="optimizer", help="registered before the failure"))
            register(PluginInfo(name="half-b", kind="not-a-kind", help="bad kind"))

        @hookimpl
        def hf_lowmem_validate(ctx):
            raise AssertionError("an unloaded plugin's hooks must not run")
        """}, {"half": "half_mod"})
    host = load_plugins()
    assert [(f.entry_point, f.distribution) for f in host.failures] == [("half", "half-dist")]
    assert "kind 'not-a-kind'" in host.failures[0].error and "optimizer, quantization" in host.failures[0].error
    assert "half-a" not in host.registry
    assert "half" not in host.loaded and not host.pm.has_plugin("half")
    host.validate(ctx=ctx_for(host))  # the failed plugin's validate is not called


# ---- misspelled hooks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("decorated", [True, False])
def test_a_misspelled_hook_is_a_load_failure(site, decorated):
    deco = "@hookimpl" if decorated else ""
    make_dist(site, "typo-dist", {"typo_mod": f"""
        from hf_lowmem import hookimpl, PluginInfo

        @hookimpl
        def hf_lowmem_register(register):
            register(PluginInfo(name="typo-opt", kind="optimizer", help="x"))

        {deco}
        def hf_lowmem_create_optimiser(ctx, model, trainer):
            return "never"
        """}, {"typo": "typo_mod"})
    make_dist(site, "zz-good-dist", {"zz_good": optimizer_plugin("zz-good")}, {"zz_good": "zz_good"})
    host = load_plugins()
    assert [(f.entry_point, f.distribution) for f in host.failures] == [("typo", "typo-dist")]
    assert "hf_lowmem_create_optimiser" in host.failures[0].error
    assert "typo-opt" not in host.registry
    # the check does not stay poisoned: a good plugin loaded after it works
    assert "zz-good" in host.registry
    with pytest.raises(PluginLoadError, match="hf_lowmem_create_optimiser"):
        load_plugins(strict=True)


def test_a_hook_with_a_wrong_argument_name_is_a_load_failure(site):
    make_dist(site, "argname-dist", {"argname_mod": """
        from hf_lowmem import hookimpl

        @hookimpl
        def hf_lowmem_validate(context):
            pass
        """}, {"argname": "argname_mod"})
    host = load_plugins()
    assert [f.entry_point for f in host.failures] == ["argname"]
    assert "context" in host.failures[0].error


def test_helpers_with_other_names_are_not_hooks(site):
    make_dist(site, "helper-dist", {"helper_mod": """
        from hf_lowmem import hookimpl, PluginInfo

        def lowmem_helper():
            return 1

        @hookimpl
        def hf_lowmem_register(register):
            register(PluginInfo(name="helper-opt", kind="optimizer", help="x"))
        """}, {"helper": "helper_mod"})
    host = load_plugins()
    assert not host.failures and "helper-opt" in host.registry


# ---- allow-list / block-list ----------------------------------------------------------------------------
@pytest.fixture
def two_dists(site):
    make_dist(site, "good-dist", {"good_mod": optimizer_plugin("good-opt")}, {"good": "good_mod"})
    make_dist(site, "broken-dist", {"broken_mod": BROKEN_AT_IMPORT}, {"broken": "broken_mod"})
    return site


@pytest.mark.parametrize("allow", ["good", "good-dist", " good , nothing-else "])
def test_allow_list_env(two_dists, monkeypatch, allow):
    monkeypatch.setenv("HF_LOWMEM_PLUGINS", allow)
    host = load_plugins()
    assert set(host.loaded) == {"core", "good"}  # core is essential: always loaded
    assert "broken" in host.blocked and not host.failures
    assert "broken_mod" not in sys.modules  # a blocked plugin is not even imported
    assert set(host.blocked) == (set(first_party_entry_points()) - ESSENTIAL) | {"broken"}


@pytest.mark.parametrize("block", ["broken", "broken-dist"])
def test_block_list_env(two_dists, monkeypatch, block):
    monkeypatch.setenv("HF_LOWMEM_DISABLE_PLUGINS", block)
    host = load_plugins()
    assert host.blocked == ["broken"] and not host.failures
    assert "good" in host.loaded and "broken_mod" not in sys.modules


def test_the_essential_core_cannot_be_blocked(two_dists, monkeypatch):
    monkeypatch.setenv("HF_LOWMEM_DISABLE_PLUGINS", f"core,{FIRST_PARTY_DIST},good,broken")
    host = load_plugins()
    assert list(host.loaded) == ["core"]
    assert host.registry.names() == ["adamw"]
    assert "core" not in host.blocked


def test_keyword_lists_override_env(two_dists, monkeypatch):
    monkeypatch.setenv("HF_LOWMEM_DISABLE_PLUGINS", "good")
    host = load_plugins(block=["broken"], allow=None)
    assert "good" in host.loaded and host.blocked == ["broken"]


def test_a_blocked_plugin_cannot_be_selected(two_dists, monkeypatch, tmp_path):
    from hf_lowmem import LowMemTrainingArguments

    monkeypatch.setenv("HF_LOWMEM_DISABLE_PLUGINS", "good")
    reset_plugin_host()
    with pytest.raises(PluginError, match=r"unknown optimizer plugin 'good-opt'\. Available: .*adamw"):
        LowMemTrainingArguments(output_dir=str(tmp_path), use_cpu=True, lowmem_optimizer="good-opt")


# ---- duplicate names --------------------------------------------------------------------------------------
def test_duplicate_plugin_names_keep_the_first_and_report_the_second(site):
    make_dist(site, "aaa-dist", {"aaa_mod": optimizer_plugin("dup-opt", marker="aaa")}, {"aaa": "aaa_mod"})
    make_dist(site, "bbb-dist", {"bbb_mod": optimizer_plugin("dup-opt", marker="bbb")}, {"bbb": "bbb_mod"})
    host = load_plugins()
    assert [(f.entry_point, f.distribution) for f in host.failures] == [("bbb", "bbb-dist")]
    assert "'dup-opt' is registered twice: by aaa and by bbb" in host.failures[0].error
    assert host.registry["dup-opt"].distribution == "aaa-dist"
    assert not host.pm.has_plugin("bbb")  # none of the loser's hooks run
    assert host.create_optimizer(ctx=ctx_for(host, optimizer=["dup-opt"]), model=None, trainer=None) == "aaa"


def test_a_third_party_plugin_cannot_take_a_first_party_name(site):
    make_dist(site, "hijack-dist", {"hijack_mod": optimizer_plugin("adamw")}, {"hijack": "hijack_mod"})
    host = load_plugins()
    assert [f.entry_point for f in host.failures] == ["hijack"]
    assert "registered twice: by core and by hijack" in host.failures[0].error
    assert host.registry["adamw"].distribution == FIRST_PARTY_DIST


def test_duplicate_entry_point_names_across_distributions(site):
    make_dist(site, "one-dist", {"same_one": optimizer_plugin("one-opt")}, {"same": "same_one"})
    make_dist(site, "two-dist", {"same_two": optimizer_plugin("two-opt")}, {"same": "same_two"})
    host = load_plugins()
    assert [(f.entry_point, f.distribution) for f in host.failures] == [("same", "two-dist")]
    assert "one-opt" in host.registry and "two-opt" not in host.registry


def test_registering_something_that_is_not_plugin_info(site):
    make_dist(site, "notinfo-dist", {"notinfo_mod": """
        from hf_lowmem import hookimpl

        @hookimpl
        def hf_lowmem_register(register):
            register({"name": "x", "kind": "optimizer"})
        """}, {"notinfo": "notinfo_mod"})
    host = load_plugins()
    assert "takes a hf_lowmem.Plugin object, got dict" in host.failures[0].error


# ---- real installs: the example third-party plugin, and a broken one ----------------------------------------------
EXAMPLE = ROOT / "examples" / "hf-lowmem-example-plugin"

BROKEN_PYPROJECT = """
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "hf-lowmem-broken-plugin"
version = "0.0.1"

[project.entry-points.hf_lowmem]
broken_import = "hf_lowmem_broken.needs_missing"
broken_hook = "hf_lowmem_broken.typo"

[tool.setuptools]
packages = ["hf_lowmem_broken"]
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """pip-install the example plugin and a broken plugin distribution into a throwaway folder (not
    the shared environment: other test runs must not see them); tests put it on sys.path/PYTHONPATH."""
    import subprocess

    root = tmp_path_factory.mktemp("installs")
    broken = root / "broken-src"
    (broken / "hf_lowmem_broken").mkdir(parents=True)
    (broken / "pyproject.toml").write_text(BROKEN_PYPROJECT)
    (broken / "hf_lowmem_broken" / "__init__.py").write_text("")
    (broken / "hf_lowmem_broken" / "needs_missing.py").write_text(
        "import a_dependency_the_author_forgot_to_declare  # noqa\n")
    (broken / "hf_lowmem_broken" / "typo.py").write_text(
        "from hf_lowmem import hookimpl\n\n@hookimpl\ndef hf_lowmem_create_optimzer(ctx, model, trainer):\n    return None\n")
    example = root / "example-src"  # a copy: building in the source tree would leave build/ and egg-info there
    shutil.copytree(EXAMPLE, example, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = root / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(target), str(example), str(broken)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert list(target.glob("hf_lowmem_example_plugin-0.1.0.dist-info/entry_points.txt"))
    return target


def test_example_plugin_is_listed_by_the_cli_next_to_a_broken_one(installed):
    import json
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_LOWMEM_")}
    env["PYTHONPATH"] = str(installed)
    r = subprocess.run([str(Path(sys.executable).parent / "hf-lowmem"), "plugins", "--json"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    example = next(p for p in data["plugins"] if p["name"] == "example-sgd")
    assert (example["kind"], example["distribution"], example["version"], example["entry_point"]) == (
        "optimizer", "hf-lowmem-example-plugin", "0.1.0", "example_sgd")
    assert example["dependencies"] == "ok" and example["modes"] == ["single", "ddp", "fsdp"]
    failed = {f["entry_point"]: f for f in data["failed"]}
    assert set(failed) == {"broken_import", "broken_hook"}
    assert {f["distribution"] for f in failed.values()} == {"hf-lowmem-broken-plugin"}
    assert "a_dependency_the_author_forgot_to_declare" in failed["broken_import"]["error"]
    assert "hf_lowmem_create_optimzer" in failed["broken_hook"]["error"]
    assert {p["name"] for p in data["plugins"]} >= {"adamw", "example-sgd"}


def test_lowmem_trainer_uses_the_installed_example_plugin(installed, site, tmp_path, caplog):
    """A broken third-party distribution is installed too: it is reported, and training goes on."""
    from transformers import Trainer, TrainingArguments

    from hf_lowmem import LowMemTrainer
    from tests.tiny import RandomTokens, logged_losses, tiny_model, train_args

    sys.path.insert(0, str(installed))
    importlib.invalidate_caches()
    try:
        reset_plugin_host()
        with caplog.at_level(logging.WARNING, logger="hf_lowmem"):
            host = get_plugin_host()
        assert host.registry["example-sgd"].distribution == "hf-lowmem-example-plugin"
        assert {(f.entry_point, f.distribution) for f in host.failures} == {
            ("broken_import", "hf-lowmem-broken-plugin"), ("broken_hook", "hf-lowmem-broken-plugin")}
        assert "hf-lowmem-broken-plugin" in caplog.text

        args = train_args(tmp_path, lowmem_optimizer="example-sgd", lowmem_options={"example-sgd": {"momentum": 0.8}})
        trainer = LowMemTrainer(model=tiny_model(), args=args, train_dataset=RandomTokens())
        trainer.train()
        opt = trainer.optimizer.optimizer
        assert type(opt) is torch_optim().SGD and opt.defaults["momentum"] == 0.8
        assert trainer.lowmem_ctx.state["example-sgd"] == {"steps": 4, "momentum": 0.8}  # its callback ran
        losses = logged_losses(trainer)

        # the same SGD handed to a plain Trainer gives the same losses: the plugin's optimizer did the training
        model = tiny_model()
        sgd = torch_optim().SGD(model.parameters(), lr=args.learning_rate, momentum=0.8)
        plain = Trainer(model=model, args=TrainingArguments(**{k: getattr(args, k) for k in (
            "output_dir", "max_steps", "per_device_train_batch_size", "learning_rate", "logging_steps", "save_strategy",
            "use_cpu", "seed", "dataloader_num_workers", "disable_tqdm")}, report_to="none"),
            train_dataset=RandomTokens(), optimizers=(sgd, None))
        plain.train()
        assert losses == logged_losses(plain)

        # the example's options are validated like any plugin's
        with pytest.raises(PluginError, match=r"'example-sgd' has no option\(s\) \['momentun'\]; its options are: "
                                              r"momentum \(default 0.9\), nesterov \(default False\)"):
            train_args(tmp_path, lowmem_optimizer="example-sgd", lowmem_options={"example-sgd": {"momentun": 0.8}})
        with pytest.raises(PluginError, match="nesterov needs a momentum above 0"):
            train_args(tmp_path, lowmem_optimizer="example-sgd",
                       lowmem_options={"example-sgd": {"momentum": 0.0, "nesterov": True}})
        # and strict mode turns the broken distribution into an error that names it
        with pytest.raises(PluginLoadError, match="hf-lowmem-broken-plugin"):
            train_args(tmp_path, lowmem_optimizer="example-sgd", lowmem_strict_plugins=True)
    finally:
        sys.path.remove(str(installed))
        for name in [m for m in sys.modules if m.startswith(("hf_lowmem_example", "hf_lowmem_broken"))]:
            del sys.modules[name]
        importlib.invalidate_caches()
        reset_plugin_host()


def _run_installed(installed, *argv, timeout=300):
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_LOWMEM_")}
    env["PYTHONPATH"] = str(installed)
    return subprocess.run(list(argv), capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def test_the_planner_plans_the_example_plugin_with_its_own_memory_model(installed):
    import json

    cli = str(Path(sys.executable).parent / "hf-lowmem")
    argv = [cli, "plan", "--model", "smollm2-135m", "--gpu-memory", "8GiB", "--host-memory", "64GiB",
            "--require", "example-sgd", "--json"]
    r = _run_installed(installed, *argv)
    assert r.returncode == 0, r.stderr
    chosen = json.loads(r.stdout)["chosen"]
    assert chosen["arguments"]["lowmem_optimizer"] == "example-sgd" and chosen["fits"]
    # the plugin's own model: one momentum buffer per parameter, fp32 (bf16-mixed keeps fp32 weights)
    assert chosen["gpu_gib"]["optimizer states"] == round(134_515_008 * 4 / 2**30, 3)
    assert not any("not counted" in n for n in chosen["notes"])
    r = _run_installed(installed, *argv, "--options", '{"example-sgd": {"momentum": 0}}')
    assert r.returncode == 0, r.stderr
    assert "optimizer states" not in json.loads(r.stdout)["chosen"]["gpu_gib"]  # no momentum, no state


def test_the_example_plugins_own_tests_pass(installed):
    r = _run_installed(installed, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "3 passed" in r.stdout


def test_the_readme_walks_through_a_plugin_with_a_memory_model_and_its_test(tmp_path, monkeypatch):
    """The "Writing a plugin" section of README.md runs as written, in under 80 lines of code."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Writing a plugin"):readme.index("\n## ", readme.index("## Writing a plugin") + 3)]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    code_lines = [line for _, block in blocks for line in block.splitlines() if line.strip()]
    assert len(code_lines) < 80, len(code_lines)
    plugin_src, test_src = [b for lang, b in blocks if lang == "python"]
    assert "my_sgd = \"my_package.plugin\"" in blocks[0][1]
    package = tmp_path / "my_package"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "plugin.py").write_text(plugin_src)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict = {}
    exec(compile(test_src, "README test", "exec"), namespace)
    try:
        namespace["test_trains_like_plain_sgd_and_the_memory_model_holds"](tmp_path / "run")
    finally:
        for name in [m for m in sys.modules if m.startswith("my_package")]:
            del sys.modules[name]


def torch_optim():
    import torch

    return torch.optim
