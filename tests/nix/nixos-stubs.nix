# Stubs of the few NixOS options the deploy modules read or define, declared with the names and
# types NixOS uses, so that a misspelt option in our modules fails as it would on NixOS.
{ lib, ... }:
let
  inherit (lib) mkOption types;
in
{
  options = {
    assertions = mkOption { type = types.listOf types.anything; default = [ ]; };
    warnings = mkOption { type = types.listOf types.str; default = [ ]; };
    systemd.services = mkOption { type = types.attrsOf types.anything; default = { }; };
    systemd.tmpfiles.rules = mkOption { type = types.listOf types.str; default = [ ]; };
    systemd.tmpfiles.settings = mkOption { type = types.attrsOf types.anything; default = { }; };
    systemd.slices = mkOption { type = types.attrsOf types.anything; default = { }; };
    users.users = mkOption { type = types.attrsOf types.anything; default = { }; };
    users.groups = mkOption { type = types.attrsOf types.anything; default = { }; };
    networking.firewall.allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
    hardware.graphics.enable = mkOption { type = types.bool; default = false; };
    hardware.nvidia-container-toolkit.enable = mkOption { type = types.bool; default = false; };
    hardware.nvidia.datacenter.enable = mkOption { type = types.bool; default = false; };
    services.xserver.videoDrivers = mkOption { type = types.listOf types.str; default = [ ]; };
    services.postgresql.enable = mkOption { type = types.bool; default = false; };
  };
}
