"""The NixOS side of deploy/: every .nix file parses, both modules evaluate (offline, with the
lib stand-in in tests/nix/) for several option sets, the exporter's generated command line is
accepted by the real CLI, its [Service] section matches the shipped unit, and the Immich
module's assertions and warnings fire exactly when they should."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from immich_gpu_exporter import __version__, config as configmod
from tests.support.deploy import UNIT_PATH, clean_env, directives
from tests.support.nested_systemd import nested_systemd  # noqa: F401  (registers the fixture)
from tests.support.proc import ROOT

NIX_ENV = {**os.environ, "NIX_CONFIG": "build-users-group ="}  # no nixbld group here
STORE_EXE = re.compile(r"^/nix/store/[0-9a-z]{32}-immich-gpu-exporter-[^/]+/bin/immich-gpu-exporter$")
pytestmark = pytest.mark.skipif(shutil.which("nix-instantiate") is None, reason="nix-instantiate (nix-bin) missing")

GPU_HOST = ("services.immich.enable = true; services.immich-gpu.enable = true; hardware.graphics.enable = true; "
            'services.xserver.videoDrivers = [ "nvidia" ];')


def nix_files() -> list[str]:
    return sorted(str(p) for p in ROOT.rglob("*.nix") if ".git" not in p.parts)


def evaluate(config_expr: str) -> dict:
    """Evaluate with one more module: the option definitions given (`lib` is in scope)."""
    r = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", str(ROOT / "tests/nix/eval.nix"),
                        "--arg", "config", "{ lib, ... }: { " + config_expr + " }"],
                       capture_output=True, text=True, env=NIX_ENV, timeout=60)
    if r.returncode != 0:  # stdout may hold partial JSON on failure: judge by the exit code
        raise EvalError(r.stderr.strip())
    return json.loads(r.stdout)


class EvalError(Exception):
    pass


def exporter_argv(result: dict) -> list[str]:
    # systemd splits ExecStart= like a shell for quoting purposes; our args use no $ or %% tricks
    return shlex.split(result["exporterService"]["serviceConfig"]["ExecStart"])


def dry_run(args: list[str], tmp_path) -> subprocess.CompletedProcess[str]:
    args = [a.replace("%d", str(tmp_path / "credentials")) for a in args]
    for i, a in enumerate(args):
        if a.startswith("--web.config.file="):  # dry-run checks the file: give it a valid one
            web = tmp_path / "web config.yml"
            web.write_text('basic_auth_users:\n  prometheus: "$2b$10$CrzTxu4/lHJ77H7u4MZT3ezY3FGsjR66lLxqAb81mmNFaKEgTAT.G"\n')
            args[i] = f"--web.config.file={web}"
        if a.startswith("--probe.key-file="):  # systemd's LoadCredential= puts the key there at start
            key = pathlib.Path(a.split("=", 1)[1])
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_text("probe-key-from-loadcredential\n")
    env = clean_env() | {"PYTHONPATH": str(ROOT), "STATE_DIRECTORY": str(tmp_path / "state")}
    return subprocess.run([sys.executable, "-m", "immich_gpu_exporter", *args, "--dry-run"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


def dry_run_values(stdout: str) -> dict[str, str]:
    out = {}
    for line in stdout.splitlines():
        key, _, rest = line.partition(" = ")
        out[key] = rest.rsplit("  # ", 1)[0]
    return out


# --- syntax ---------------------------------------------------------------------------------

def test_there_are_nix_files_to_check():
    names = {os.path.relpath(p, ROOT) for p in nix_files()}
    assert {"flake.nix", "deploy/nixos/module.nix", "deploy/nixos/immich-gpu.nix", "deploy/nixos/package.nix",
            "tests/nix/lib.nix", "tests/nix/eval.nix"} <= names


@pytest.mark.parametrize("path", nix_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_nix_file_parses(path):
    r = subprocess.run(["nix-instantiate", "--parse", path], capture_output=True, text=True, env=NIX_ENV, timeout=60)
    assert r.returncode == 0, r.stderr


def test_parse_check_rejects_broken_nix(tmp_path):
    bad = tmp_path / "broken.nix"
    bad.write_text("{ a = 1 }")
    r = subprocess.run(["nix-instantiate", "--parse", str(bad)], capture_output=True, text=True, env=NIX_ENV)
    assert r.returncode != 0 and "syntax error" in r.stderr


# --- the exporter module --------------------------------------------------------------------

OPTION_SETS = {
    "defaults": "services.immich-gpu-exporter.enable = true;",
    "everything": """services.immich-gpu-exporter = {
        enable = true; listenAddress = "0.0.0.0"; port = 9999; openFirewall = true;
        units = [ "immich-machine-learning.service" "custom unit.service" ];
        journalUnits = [ "immich-machine-learning.service" ];
        immichUrl = "https://photos.example.org"; mlUrl = "http://10.0.0.5:3003";
        apiKeyFile = "/run/secrets/immich key";
        collectors = { nvml = true; systemd = false; journal = true; immich = false; };
        extraFlags = [ "--log.level=debug" "--gpu.pid-labels" ];
        webConfigFile = "/etc/immich-gpu-exporter/web config.yml";
        immichTelemetry = true;
        probe = { interval = 600; keyFile = "/run/secrets/probe key"; };
      };""",
    "ipv6": 'services.immich-gpu-exporter = { enable = true; listenAddress = "::1"; };',
    "server-role": """services.immich-gpu-exporter = {
        enable = true; role = "server"; mlUrl = "http://gpu1.lan:3003"; mlFailoverUrls = [ "http://gpu2.lan:3003" ];
        remoteMlExporterUrls = [ "http://gpu1.lan:10283/metrics" "http://gpu2.lan:10283/metrics" ];
      };""",
    "ml-role": 'services.immich-gpu-exporter = { enable = true; role = "ml"; };',
    "with-immich-port": "services.immich-gpu-exporter.enable = true; services.immich.enable = true; "
                        "services.immich.port = 3001;",
}


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_generated_command_line_is_accepted_by_the_exporter(name, tmp_path):
    result = evaluate(OPTION_SETS[name])
    argv = exporter_argv(result)
    assert STORE_EXE.match(argv[0]), argv[0]
    r = dry_run(argv[1:], tmp_path)
    assert r.returncode == 0, r.stderr


def test_generated_flags_carry_the_options_through(tmp_path):
    result = evaluate(OPTION_SETS["everything"])
    values = dry_run_values(dry_run(exporter_argv(result)[1:], tmp_path).stdout)
    assert values["web.listen-address"] == "'0.0.0.0:9999'"
    assert values["systemd.unit"] == "('immich-machine-learning.service', 'custom unit.service')"
    assert values["immich.url"] == "'https://photos.example.org'"
    assert values["immich.ml-url"] == "'http://10.0.0.5:3003'"
    assert values["immich.api-key-file"] == f"'{tmp_path}/credentials/immich-api-key'"
    assert (values["collector.systemd"], values["collector.immich"], values["collector.nvml"]) == ("False", "False", "True")
    assert values["log.level"] == "'debug'" and values["gpu.pid-labels"] == "True"
    assert values["immich.telemetry-url"] == "'http://localhost:8082/metrics'"
    assert values["immich.api-telemetry-url"] == "'http://localhost:8081/metrics'"
    assert values["probe.interval"] == "600.0"
    assert values["probe.key-file"] == f"'{tmp_path}/credentials/immich-probe-key'"
    sc = result["exporterService"]["serviceConfig"]
    assert sc["LoadCredential"] == ["immich-api-key:/run/secrets/immich key", "immich-probe-key:/run/secrets/probe key"]
    assert "--web.config.file=/etc/immich-gpu-exporter/web config.yml" in exporter_argv(result)
    assert sc["ExecReload"].endswith("/bin/kill -HUP $MAINPID")  # systemctl reload re-reads the web config
    assert result["firewall"] == [9999]


def test_roles_of_a_remote_ml_set_up_reach_the_exporter(tmp_path):
    server = dry_run_values(dry_run(exporter_argv(evaluate(OPTION_SETS["server-role"]))[1:], tmp_path).stdout)
    assert server["deployment.role"] == "'server'" and server["collector.immich"] == "True"
    assert server["immich.ml-failover-url"] == "('http://gpu2.lan:3003',)"
    assert server["remote-ml.exporter-url"] == "('http://gpu1.lan:10283/metrics', 'http://gpu2.lan:10283/metrics')"
    ml = dry_run_values(dry_run(exporter_argv(evaluate(OPTION_SETS["ml-role"]))[1:], tmp_path).stdout)
    assert ml["deployment.role"] == "'ml'" and ml["collector.immich"] == "False"


def test_ipv6_listen_address_is_bracketed(tmp_path):
    values = dry_run_values(dry_run(exporter_argv(evaluate(OPTION_SETS["ipv6"]))[1:], tmp_path).stdout)
    assert values["web.listen-address"] == "'[::1]:10283'"


def test_immich_url_follows_services_immich_port():
    assert evaluate(OPTION_SETS["with-immich-port"])["exporter"]["immichUrl"] == "http://localhost:3001"


def test_defaults_match_the_exporter_defaults(tmp_path):
    """The module repeats a few defaults on the command line; they must be the exporter's own."""
    result = evaluate(OPTION_SETS["defaults"])
    exp = result["exporter"]
    assert tuple(exp["units"]) == configmod.SYSTEMD_DEFAULT_UNITS
    assert tuple(exp["journalUnits"]) == configmod.OPTIONS_BY_KEY["journal.unit"].default
    assert f"{exp['listenAddress']}:{exp['port']}" == configmod.DEFAULT_LISTEN
    assert exp["mlUrl"] == configmod.OPTIONS_BY_KEY["immich.ml-url"].default
    assert result["firewall"] == [] and result["exporterService"]["serviceConfig"]["LoadCredential"] == []


def test_module_creates_the_service_user():
    users = evaluate(OPTION_SETS["defaults"])["users"]
    assert users["immich-gpu-exporter"]["isSystemUser"] is True


def test_disabled_module_defines_no_service():
    result = evaluate("services.immich-gpu-exporter.enable = false;")
    assert result["exporterService"] is None


def test_package_builds_this_version_with_the_runtime_dependencies():
    pkg = evaluate(OPTION_SETS["defaults"])["exporterPackage"]
    assert (pkg["pname"], pkg["version"]) == ("immich-gpu-exporter", __version__)
    assert pkg["meta"]["mainProgram"] == "immich-gpu-exporter"
    # the nixpkgs attribute names of pyproject.toml's dependencies
    assert sorted(pkg["dependencies"]) == ["aiohttp", "bcrypt", "nvidia-ml-py", "prometheus-client", "pystemd",
                                           "pyyaml"]


def _as_unit_values(value) -> list[str]:
    """A NixOS serviceConfig value as the unit-file lines NixOS renders from it."""
    items = value if isinstance(value, list) else [value]
    return [("yes" if v else "no") if isinstance(v, bool) else str(v) for v in items]


def test_module_service_is_the_shipped_unit():
    shipped = directives(UNIT_PATH.read_text())
    nix = evaluate(OPTION_SETS["defaults"])["exporterService"]["serviceConfig"]
    # Deliberate NixOS differences: the binary path, no environment file (options instead), and
    # the credential from apiKeyFile rather than the credstore name.
    skip = {"ExecStart", "EnvironmentFile", "LoadCredential", "ExecReload"}  # ExecReload: the kill binary's path
    assert {k: _as_unit_values(v) for k, v in nix.items() if k not in skip} == \
        {k: v for k, v in shipped.items() if k not in skip}


def test_option_type_errors_are_reported():
    # nixpkgs' types.port is ints.u16; its description names the range
    with pytest.raises(EvalError, match=r"not of type `16 bit unsigned integer; between 0 and 65535 \(both inclusive\)'"):
        evaluate("services.immich-gpu-exporter = { enable = true; port = 70000; };")
    with pytest.raises(EvalError, match=r"The option `services.immich-gpu-exporter.prot' does not exist"):
        evaluate("services.immich-gpu-exporter = { enable = true; prot = 1; };")


# --- the Immich GPU module ------------------------------------------------------------------

def test_immich_gpu_on_a_complete_host_configures_the_units():
    result = evaluate(GPU_HOST)
    assert result["failedAssertions"] == [] and result["warnings"] == []
    devices = result["accelerationDevices"]
    assert {"/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia0"} <= set(devices)
    ml, server = result["mlService"], result["serverService"]
    env = ml["environment"]
    assert env["MACHINE_LEARNING_DEVICE_ID"] == "0"
    assert env["MPLCONFIGDIR"] == "/var/cache/immich/matplotlib"
    assert int(env["COLUMNS"]) > 80
    assert env["PYTHONUNBUFFERED"] == "1"  # ORT's EP Error block reaches the journal when printed
    assert env["MACHINE_LEARNING_CACHE_FOLDER"] == "/var/cache/immich"  # nixpkgs' default kept
    assert "ONNXRUNTIME_PROVIDER" not in env and not any("TENSORRT" in k for k in env)
    assert ml["serviceConfig"]["LimitMEMLOCK"] == "infinity"
    assert ml["serviceConfig"]["Nice"] == -10 and server["serviceConfig"]["Nice"] == -5
    assert ml["serviceConfig"]["PrivateDevices"] is False
    assert ml["serviceConfig"]["DeviceAllow"] == devices
    assert ml["serviceConfig"]["CacheDirectoryMode"] == "0750"
    assert "d /var/cache/immich/matplotlib 0750 immich immich -" in result["tmpfiles"]
    # no container toolkit on this host: no ordering on a unit that does not exist
    assert "nvidia-container-toolkit-cdi-generator.service" not in ml["after"]


def test_probe_without_a_key_file_fails_the_evaluation():
    r = evaluate("services.immich-gpu-exporter = { enable = true; probe.interval = 300; };")
    assert any("probe.keyFile is not" in m for m in r["failedAssertions"]), r["failedAssertions"]
    assert evaluate("services.immich-gpu-exporter.enable = true;")["failedAssertions"] == []


def test_immich_gpu_telemetry_turns_on_the_servers_repository_durations():
    assert "IMMICH_TELEMETRY_INCLUDE" not in evaluate(GPU_HOST)["serverService"]["environment"]
    env = evaluate(GPU_HOST + " services.immich-gpu.telemetry = true;")["serverService"]["environment"]
    assert env["IMMICH_TELEMETRY_INCLUDE"] == "all"
    own = evaluate(GPU_HOST + ' services.immich-gpu.telemetry = true; '
                   'services.immich.environment.IMMICH_TELEMETRY_INCLUDE = "job,repo";')
    assert own["serverService"]["environment"]["IMMICH_TELEMETRY_INCLUDE"] == "job,repo"  # the user's value wins


def test_immich_gpu_orders_after_the_cdi_generator_when_the_toolkit_is_on():
    ml = evaluate(GPU_HOST + " hardware.nvidia-container-toolkit.enable = true;")["mlService"]
    assert "nvidia-container-toolkit-cdi-generator.service" in ml["after"]
    assert "nvidia-container-toolkit-cdi-generator.service" not in ml.get("requires", [])


def test_immich_gpu_options_change_the_units():
    result = evaluate(GPU_HOST + """ services.immich-gpu = { deviceId = 1; gpuDeviceNodes = [ "/dev/nvidia1" ];
                                     memlock = false; mlNice = null; serverNice = null; };""")
    ml = result["mlService"]
    assert ml["environment"]["MACHINE_LEARNING_DEVICE_ID"] == "1"
    assert "/dev/nvidia1" in result["accelerationDevices"] and "/dev/nvidia0" not in result["accelerationDevices"]
    assert "LimitMEMLOCK" not in ml["serviceConfig"] and "Nice" not in ml["serviceConfig"]
    assert "Nice" not in result["serverService"]["serviceConfig"]


ASSERTION_CASES = {
    # with Immich off its PostgreSQL is off too, so that assertion fires as well
    "immich-off": ("services.immich-gpu.enable = true; hardware.graphics.enable = true; "
                   'services.xserver.videoDrivers = [ "nvidia" ]; services.postgresql.enable = true;',
                   "needs services.immich.enable"),
    "ml-off": (GPU_HOST + " services.immich.machine-learning.enable = false;", "needs services.immich.enable"),
    "no-gpu": (GPU_HOST.replace("hardware.graphics.enable = true;", ""), "hardware.graphics.enable"),
    "not-nvidia": (GPU_HOST.replace('[ "nvidia" ]', '[ "amdgpu" ]'), "supports NVIDIA only"),
    "toolkit-missing": (GPU_HOST + " services.immich-gpu.requireContainerToolkit = true;",
                        "hardware.nvidia-container-toolkit.enable is false"),
    # nixpkgs sets the cache folder at normal priority, so only mkForce can replace it
    "relative-cache": (GPU_HOST + ' services.immich.machine-learning.environment.MACHINE_LEARNING_CACHE_FOLDER = '
                       'lib.mkForce "cache";', "storage paths must be absolute"),
    "no-postgresql": (GPU_HOST + " services.immich.database.enable = false;", "PostgreSQL is not enabled"),
}


@pytest.mark.parametrize("case", sorted(ASSERTION_CASES))
def test_immich_gpu_assertion_fires(case):
    expr, message = ASSERTION_CASES[case]
    failed = evaluate(expr)["failedAssertions"]
    assert len(failed) == 1 and message in failed[0], failed


def test_immich_gpu_assertions_can_be_relaxed():
    assert evaluate(GPU_HOST + " services.immich.database.enable = false; "
                    "services.immich-gpu.requirePostgresql = false;")["failedAssertions"] == []
    assert evaluate(GPU_HOST + " services.immich-gpu.requireContainerToolkit = true; "
                    "hardware.nvidia-container-toolkit.enable = true;")["failedAssertions"] == []


def test_settings_that_immich_ignores_produce_warnings():
    result = evaluate(GPU_HOST + """ services.immich.machine-learning.environment = {
        ONNXRUNTIME_PROVIDER = "cuda"; TENSORRT_CACHE_PATH = "/var/lib/immich/.cache/tensorrt";
        MACHINE_LEARNING_DEVICE_IDS = "0"; };""")
    text = "\n".join(result["warnings"])
    assert len(result["warnings"]) == 3
    for name in ("ONNXRUNTIME_PROVIDER", "TENSORRT_CACHE_PATH", "MACHINE_LEARNING_DEVICE_IDS"):
        assert f"environment.{name} has no effect" in text


def test_immich_gpu_disabled_changes_nothing():
    result = evaluate("services.immich.enable = true;")
    assert result["accelerationDevices"] == [] and result["tmpfiles"] == [] and result["failedAssertions"] == []
    assert result["mlService"]["serviceConfig"]["PrivateDevices"] is True
    assert "COLUMNS" not in result["mlService"]["environment"]
    assert "PYTHONUNBUFFERED" not in result["mlService"]["environment"]


# --- checks against the real nixpkgs semantics (nixpkgs @ b1325fd54d3a: immich.nix; NixOS utils) --

HOSTILE = {
    # systemd would expand %n / $HOME and C-unescape \t inside quotes: each must arrive verbatim
    "immichUrl": "http://localhost:2283/a%20b",
    "units": ["it's a unit.service", "back\\tslash.service"],
    "extraFlags": ["--log.level=debug", "--systemd.unit=$HOME-%n.service"],
}


def test_exec_start_reaches_the_exporter_verbatim_under_real_systemd(nested_systemd, tmp_path):
    """systemd, not a shell, splits ExecStart=: quotes carry C escapes, and % and $ expand. The
    module's quoting must survive the real parser; an argv dumper stands in for the exporter."""
    key = nested_systemd.base / "key"
    key.write_text("k\n")
    nix_str = lambda v: json.dumps(v)  # JSON strings are valid Nix strings for this ASCII input
    result = evaluate(f"""services.immich-gpu-exporter = {{ enable = true;
        immichUrl = {nix_str(HOSTILE["immichUrl"])};
        units = [ {" ".join(map(nix_str, HOSTILE["units"]))} ];
        extraFlags = [ {" ".join(map(nix_str, HOSTILE["extraFlags"]))} ];
        apiKeyFile = {nix_str(str(key))}; }};""")
    exec_start = result["exporterService"]["serviceConfig"]["ExecStart"]
    exe, rest = exec_start.split(" ", 1)  # the store path has no blank, quoted or not
    assert STORE_EXE.match(exe.strip('"')), exe
    dumper = nested_systemd.base / "argv.py"
    out = nested_systemd.base / "argv.json"
    dumper.write_text(f"import json, sys\nopen({str(out)!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    nested_systemd.add_unit("argv.service", "[Service]\nType=oneshot\n"
                            f"LoadCredential=immich-api-key:{key}\n"
                            f"ExecStart={json.dumps(sys.executable)} {json.dumps(str(dumper))} {rest}\n")
    nested_systemd.start_unit("argv.service")
    argv = json.loads(out.read_text())
    assert f"--immich.url={HOSTILE['immichUrl']}" in argv
    assert [a for a in argv if a.startswith("--systemd.unit=")] == \
        [f"--systemd.unit={u}" for u in HOSTILE["units"]] + ["--systemd.unit=$HOME-%n.service"]
    assert argv[-2:] == HOSTILE["extraFlags"]  # last, so they can override the module's flags
    key_flag = [a for a in argv if a.startswith("--immich.api-key-file=")]
    assert key_flag == ["--immich.api-key-file=/run/credentials/argv.service/immich-api-key"]
    # and the exporter accepts the command line systemd produced
    r = dry_run([a.replace("/run/credentials/argv.service", str(tmp_path / "credentials")) for a in argv], tmp_path)
    assert r.returncode == 0, r.stderr


def test_immich_environment_is_a_freeform_submodule_as_in_nixpkgs():
    """nixpkgs declares both environments as submodule { freeformType = attrsOf str; }: values merge
    per name, two different strings for one name at the same priority are an error, and the value
    has no _module attribute."""
    result = evaluate(GPU_HOST + ' services.immich.machine-learning.environment.MACHINE_LEARNING_MODEL_TTL = "600";')
    env = result["mlEnvironment"]
    assert env["MACHINE_LEARNING_MODEL_TTL"] == "600" and env["XDG_CACHE_HOME"] == "/var/cache/immich"
    assert "_module" not in env and result["mlService"]["environment"] == env
    with pytest.raises(EvalError, match="conflicting definition values"):
        evaluate(GPU_HOST + ' services.immich.machine-learning.environment.COLUMNS = "200";')
    with pytest.raises(EvalError, match="is not of type `string'"):
        evaluate(GPU_HOST + " services.immich.machine-learning.environment.COLUMNS = 200;")


def test_a_users_own_mplconfigdir_wins_without_mkforce():
    env = evaluate(GPU_HOST + ' services.immich.machine-learning.environment.MPLCONFIGDIR = "/srv/mpl";')["mlEnvironment"]
    assert env["MPLCONFIGDIR"] == "/srv/mpl"


def test_media_location_may_be_a_path_literal():
    """types.path (nixpkgs' mediaLocation) accepts a path literal; the storage assertion must too."""
    result = evaluate(GPU_HOST + " services.immich.mediaLocation = /srv/photos;")
    assert result["failedAssertions"] == []
    assert "/srv/photos" in result["tmpfilesSettings"]["immich"]


def test_datacenter_driver_satisfies_the_nvidia_assertion():
    """nixpkgs loads the NVIDIA driver for hardware.nvidia.datacenter.enable without "nvidia" in
    videoDrivers (and forbids setting both)."""
    host = GPU_HOST.replace('services.xserver.videoDrivers = [ "nvidia" ];', "hardware.nvidia.datacenter.enable = true;")
    assert evaluate(host)["failedAssertions"] == []


def test_other_acceleration_devices_merge_and_null_is_rejected():
    devices = evaluate(GPU_HOST + ' services.immich.accelerationDevices = [ "/dev/dri/renderD128" ];')["accelerationDevices"]
    assert "/dev/dri/renderD128" in devices and "/dev/nvidiactl" in devices
    # nullOr: a null next to a list is an error in nixpkgs' lib, documented in the option text
    with pytest.raises(EvalError, match="defined both null and not null"):
        evaluate(GPU_HOST + " services.immich.accelerationDevices = null;")


def test_immich_ml_unit_keeps_nixpkgs_ordering_and_adds_ours():
    ml = evaluate(GPU_HOST + " hardware.nvidia-container-toolkit.enable = true;")["mlService"]
    assert ml["after"] == ["network.target", "postgresql.target", "nvidia-container-toolkit-cdi-generator.service"]
    assert ml["requires"] == ["postgresql.target"]
