# A reduced stand-in for nixpkgs' services.immich (nixos/modules/services/web-apps/immich.nix),
# checked against nixpkgs @ b1325fd54d3a70772aae07dc3f39ec55e904dafa: every option it declares,
# with the same name, type and default (descriptions left out; `settings` and `redis.host`
# simplified, see below), the environment defaults it sets at normal priority, and the parts of
# the two units our immich-gpu module adds to or relies on (ordering, devices, cache directory,
# user). Written from those facts; not a copy of the module.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption mkEnableOption mkIf types;
  cfg = config.services.immich;
  freeformStrings = types.submodule { freeformType = types.attrsOf types.str; };
  # Only what decides where nixpkgs puts devices; the rest of its hardening is not ours to check.
  common = {
    PrivateDevices = cfg.accelerationDevices == [ ];
    DeviceAllow = mkIf (cfg.accelerationDevices != null) cfg.accelerationDevices;
    PrivateUsers = true;
    NoNewPrivileges = true;
    UMask = "0077";
  };
  dbUnits = lib.optionals cfg.database.enable [ "postgresql.target" ];
in
{
  options.services.immich = {
    enable = mkEnableOption "Immich";
    package = mkOption { type = types.package; default = pkgs.immich; };
    mediaLocation = mkOption { type = types.path; default = "/var/lib/immich"; };
    environment = mkOption { type = freeformStrings; default = { }; };
    secretsFile = mkOption { type = types.nullOr types.str; default = null; };
    host = mkOption { type = types.str; default = "localhost"; };
    port = mkOption { type = types.port; default = 2283; };
    openFirewall = mkOption { type = types.bool; default = false; };
    user = mkOption { type = types.str; default = "immich"; };
    group = mkOption { type = types.str; default = "immich"; };
    # nixpkgs: null or a JSON-format submodule; opaque here.
    settings = mkOption { type = types.nullOr types.anything; default = null; };
    machine-learning.enable = mkEnableOption "immich's machine-learning functionality" // { default = true; };
    machine-learning.environment = mkOption { type = freeformStrings; default = { }; };
    accelerationDevices = mkOption { type = types.nullOr (types.listOf types.str); default = [ ]; };
    database.enable = mkEnableOption "the postgresql database" // { default = true; };
    database.enableVectorChord = mkEnableOption "VectorChord" // { default = true; };
    # nixpkgs: lib.versionOlder config.system.stateVersion "25.11"; a fresh install here.
    database.enableVectors = mkEnableOption "pgvecto.rs" // { default = false; };
    database.createDB = mkEnableOption "creating the database" // { default = true; };
    database.name = mkOption { type = types.str; default = "immich"; };
    database.host = mkOption { type = types.str; default = "/run/postgresql"; };
    database.port = mkOption { type = types.port; default = 5432; };
    database.user = mkOption { type = types.str; default = "immich"; };
    redis.enable = mkEnableOption "a redis cache" // { default = true; };
    # nixpkgs: config.services.redis.servers.immich.unixSocket, i.e. this path.
    redis.host = mkOption { type = types.str; default = "/run/redis-immich/redis.sock"; };
    redis.port = mkOption { type = types.port; default = 0; };
  };

  config = mkIf cfg.enable {
    services.postgresql.enable = mkIf cfg.database.enable true;
    networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall [ cfg.port ];
    services.immich.environment = {
      IMMICH_HOST = cfg.host;
      IMMICH_PORT = toString cfg.port;
      IMMICH_MEDIA_LOCATION = toString cfg.mediaLocation;
      IMMICH_MACHINE_LEARNING_URL = "http://localhost:3003";
    };
    services.immich.machine-learning.environment = {
      MACHINE_LEARNING_WORKERS = "1";
      MACHINE_LEARNING_WORKER_TIMEOUT = "120";
      MACHINE_LEARNING_CACHE_FOLDER = "/var/cache/immich";
      XDG_CACHE_HOME = "/var/cache/immich";
      IMMICH_HOST = "localhost";
      IMMICH_PORT = "3003";
    };
    systemd.services.immich-server = {
      requires = mkIf cfg.database.enable dbUnits;
      after = [ "network.target" ] ++ dbUnits;
      wantedBy = [ "multi-user.target" ];
      environment = cfg.environment;
      serviceConfig = common // {
        ExecStart = "${cfg.package}/bin/server";
        Slice = "system-immich.slice";
        StateDirectory = "immich";
        SyslogIdentifier = "immich";
        User = cfg.user;
        Group = cfg.group;
      };
    };
    systemd.services.immich-machine-learning = mkIf cfg.machine-learning.enable {
      requires = mkIf cfg.database.enable dbUnits;
      after = [ "network.target" ] ++ dbUnits;
      wantedBy = [ "multi-user.target" ];
      environment = cfg.machine-learning.environment;
      serviceConfig = common // {
        ExecStart = "${cfg.package}/bin/machine-learning";
        Slice = "system-immich.slice";
        CacheDirectory = "immich";
        User = cfg.user;
        Group = cfg.group;
      };
    };
    systemd.tmpfiles.settings.immich.${toString cfg.mediaLocation}.e = { user = cfg.user; group = cfg.group; mode = "0700"; };
    users.users = mkIf (cfg.user == "immich") { immich = { group = cfg.group; isSystemUser = true; }; };
    users.groups = mkIf (cfg.group == "immich") { immich = { }; };
  };
}
