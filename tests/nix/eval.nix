# Evaluates deploy/nixos/{module,immich-gpu}.nix with the lib stand-in, NixOS stubs and a stub
# pkgs, for one test configuration, and returns what the tests check:
#   nix-instantiate --eval --strict --json tests/nix/eval.nix --arg config '<module>'
{ config ? { } }:
let
  lib = import ./lib.nix;
  store = name: "/nix/store/00000000000000000000000000000000-${name}";
  python3Packages =
    let dep = name: { inherit name; outPath = store name; }; in
    {
      buildPythonApplication = a: a // {
        name = "${a.pname}-${a.version}";
        outPath = store "${a.pname}-${a.version}";
      };
      setuptools = dep "setuptools";
      prometheus-client = dep "prometheus-client";
      nvidia-ml-py = dep "nvidia-ml-py";
      psutil = dep "psutil";
      aiohttp = dep "aiohttp";
      pystemd = dep "pystemd";
      bcrypt = dep "bcrypt";
      pyyaml = dep "pyyaml";
    };
  libForPackages = lib // {
    # fileset is only used to select the package's sources; the stub keeps the root.
    fileset = { toSource = { root, fileset }: root; unions = xs: xs; };
    licenses.mit = "mit";
    platforms.linux = [ "x86_64-linux" "aarch64-linux" ];
  };
  pkgs = {
    callPackage = fn: args: import fn ({ lib = libForPackages; inherit python3Packages; } // args);
    immich = { name = "immich"; outPath = store "immich"; };
    coreutils = { name = "coreutils"; outPath = store "coreutils"; };
  };
  eval = lib.evalModules {
    modules = [ ./nixos-stubs.nix ./immich-stub.nix ../../deploy/nixos/module.nix ../../deploy/nixos/immich-gpu.nix config ];
    specialArgs = { inherit pkgs; utils = import ./utils.nix; };
  };
  c = eval.config;
in
{
  exporter = c.services.immich-gpu-exporter;
  exporterService = c.systemd.services.immich-gpu-exporter or null;
  exporterPackage = let p = c.services.immich-gpu-exporter.package; in { inherit (p) pname version meta; dependencies = map (d: d.name) p.dependencies; path = "${p}"; };
  immichGpu = c.services.immich-gpu;
  mlService = c.systemd.services.immich-machine-learning or null;
  serverService = c.systemd.services.immich-server or null;
  accelerationDevices = c.services.immich.accelerationDevices;
  tmpfiles = c.systemd.tmpfiles.rules;
  tmpfilesSettings = c.systemd.tmpfiles.settings;
  firewall = c.networking.firewall.allowedTCPPorts;
  users = c.users.users;
  immichEnvironment = c.services.immich.environment;
  mlEnvironment = c.services.immich.machine-learning.environment;
  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) c.assertions);
  warnings = c.warnings;
}
