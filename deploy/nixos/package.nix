# The exporter as a Nix package, built from this checkout with nixpkgs' Python packages.
#   pkgs.callPackage ./deploy/nixos/package.nix { }
# NVML: nixpkgs' nvidia-ml-py is patched to load libnvidia-ml.so.1 from /run/opengl-driver/lib
# (addDriverRunpath.driverLink), so no LD_LIBRARY_PATH wrapper is needed on NixOS.
{ lib, python3Packages }:

let
  # One source of truth for the version: the package's own __version__.
  initPy = builtins.readFile ../../immich_gpu_exporter/__init__.py;
  version = builtins.head (builtins.match ''.*__version__ = "([^"]+)".*'' initPy);
in
python3Packages.buildPythonApplication {
  pname = "immich-gpu-exporter";
  inherit version;
  pyproject = true;

  # Only what the wheel needs, so editing tests or docs does not rebuild the package.
  src = lib.fileset.toSource {
    root = ../..;
    fileset = lib.fileset.unions [
      ../../pyproject.toml
      ../../README.md
      ../../immich_gpu_exporter
    ];
  };

  build-system = [ python3Packages.setuptools ];

  dependencies = with python3Packages; [
    prometheus-client
    nvidia-ml-py
    aiohttp
    pystemd
    bcrypt
    pyyaml
  ];

  # The test suite needs root, a nested systemd, gcc and promtool; it runs in CI, not in the sandbox.
  doCheck = false;
  pythonImportsCheck = [ "immich_gpu_exporter" "immich_gpu_exporter.cli" ];

  meta = {
    description = "Prometheus exporter that proves whether Immich really runs its ML on the GPU";
    license = lib.licenses.mit;
    mainProgram = "immich-gpu-exporter";
    platforms = lib.platforms.linux;
  };
}
