# A reduced stand-in for nixpkgs' services.immich (nixos/modules/services/web-apps/immich.nix),
# written from its documented behaviour (research/immich.md section 5): the option names and
# types our immich-gpu module touches, the ML environment defaults it sets at normal priority,
# the two units and how accelerationDevices becomes PrivateDevices=/DeviceAllow=.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption mkEnableOption mkIf types;
  cfg = config.services.immich;
  common = {
    PrivateDevices = cfg.accelerationDevices == [ ];
    DeviceAllow = mkIf (cfg.accelerationDevices != null) cfg.accelerationDevices;
    PrivateUsers = true;
    NoNewPrivileges = true;
  };
in
{
  options.services.immich = {
    enable = mkEnableOption "Immich";
    package = mkOption { type = types.package; default = pkgs.immich; };
    mediaLocation = mkOption { type = types.path; default = "/var/lib/immich"; };
    environment = mkOption { type = types.attrsOf types.str; default = { }; };
    host = mkOption { type = types.str; default = "localhost"; };
    port = mkOption { type = types.port; default = 2283; };
    user = mkOption { type = types.str; default = "immich"; };
    group = mkOption { type = types.str; default = "immich"; };
    accelerationDevices = mkOption { type = types.nullOr (types.listOf types.str); default = [ ]; };
    machine-learning.enable = mkEnableOption "immich ML" // { default = true; };
    machine-learning.environment = mkOption { type = types.attrsOf types.str; default = { }; };
    database.enable = mkEnableOption "the postgresql database" // { default = true; };
    database.host = mkOption { type = types.str; default = "/run/postgresql"; };
  };

  config = mkIf cfg.enable {
    services.postgresql.enable = mkIf cfg.database.enable true;
    services.immich.environment.IMMICH_PORT = toString cfg.port;
    services.immich.machine-learning.environment = {
      MACHINE_LEARNING_WORKERS = "1";
      MACHINE_LEARNING_WORKER_TIMEOUT = "120";
      MACHINE_LEARNING_CACHE_FOLDER = "/var/cache/immich";
      IMMICH_HOST = "localhost";
      IMMICH_PORT = "3003";
    };
    systemd.services.immich-server = {
      after = [ "network.target" ];
      environment = cfg.environment;
      serviceConfig = common // { ExecStart = "${cfg.package}/bin/server"; User = cfg.user; Group = cfg.group; StateDirectory = "immich"; };
    };
    systemd.services.immich-machine-learning = mkIf cfg.machine-learning.enable {
      after = [ "network.target" ];
      environment = cfg.machine-learning.environment;
      serviceConfig = common // {
        ExecStart = "${cfg.package}/bin/machine-learning";
        CacheDirectory = "immich";
        User = cfg.user;
        Group = cfg.group;
      };
    };
  };
}
