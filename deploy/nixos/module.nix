# services.immich-gpu-exporter: the exporter as a hardened systemd service.
#
# It renders the same [Service] hardening as deploy/systemd/immich-gpu-exporter.service (a test
# compares the two line by line); the reasons for each setting are written there and in
# docs/deploy.md. Differences, both NixOS idioms: the API key comes from `apiKeyFile` through
# LoadCredential= instead of /etc/credstore, and configuration is flags, not an environment file.
{ config, lib, pkgs, utils, ... }:

let
  cfg = config.services.immich-gpu-exporter;
  inherit (lib) mkOption mkEnableOption mkIf types;

  collectorNames = [ "processes" "nvml" "systemd" "journal" "immich" ];

  # [::1] needs brackets in HOST:PORT; a bare hostname or IPv4 address does not.
  listenHost = if lib.hasInfix ":" cfg.listenAddress then "[${cfg.listenAddress}]" else cfg.listenAddress;

  args =
    [
      "--web.listen-address=${listenHost}:${toString cfg.port}"
      "--immich.url=${cfg.immichUrl}"
      "--immich.ml-url=${cfg.mlUrl}"
      "--deployment.role=${cfg.role}"
    ]
    ++ map (u: "--immich.ml-failover-url=${u}") cfg.mlFailoverUrls
    ++ map (u: "--remote-ml.exporter-url=${u}") cfg.remoteMlExporterUrls
    ++ map (u: "--systemd.unit=${u}") cfg.units
    ++ map (u: "--journal.unit=${u}") cfg.journalUnits
    ++ map (c: if cfg.collectors.${c} then "--collector.${c}" else "--no-collector.${c}") collectorNames
    ++ lib.optional (cfg.webConfigFile != null) "--web.config.file=${cfg.webConfigFile}"
    ++ lib.optionals cfg.immichTelemetry [
      "--immich.telemetry-url=http://localhost:8082/metrics"
      "--immich.api-telemetry-url=http://localhost:8081/metrics"
    ];

  # ExecStart= is split by systemd, not by a shell: it processes C escapes inside quotes too and
  # expands % specifiers and $VARIABLES, so lib.escapeShellArgs would mangle a backslash, `%` or
  # `$` in a URL or an extra flag. NixOS' utils.escapeSystemdExecArgs quotes for systemd instead.
  # The key-file flag is the one argument that must keep its specifier: %d is the service's
  # private credentials directory, which systemd expands at start. extraFlags come last, so they
  # can still override any flag above.
  execStart = lib.concatStringsSep " " (
    [ (utils.escapeSystemdExecArgs ([ (lib.getExe cfg.package) ] ++ args)) ]
    ++ lib.optional (cfg.apiKeyFile != null) "--immich.api-key-file=%d/immich-api-key"
    ++ lib.optionals (cfg.probe.interval > 0) [
      "--probe.interval=${toString cfg.probe.interval}"
      "--probe.key-file=%d/immich-probe-key"
    ]
    ++ lib.optional (cfg.extraFlags != [ ]) (utils.escapeSystemdExecArgs cfg.extraFlags)
  );

  collectorOption = name: description: mkOption {
    type = types.bool;
    default = true;
    description = "Whether to run the ${name} collector (${description}).";
  };
in
{
  options.services.immich-gpu-exporter = {
    enable = mkEnableOption "the Prometheus exporter that shows whether Immich really runs its ML on the GPU";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./package.nix { }";
      description = "The immich-gpu-exporter package to run.";
    };

    listenAddress = mkOption {
      type = types.str;
      default = "127.0.0.1";
      example = "0.0.0.0";
      description = ''
        Address to serve /metrics on. Loopback by default; use "0.0.0.0" or "::" (and
        `openFirewall`) when Prometheus scrapes from another host.
      '';
    };

    port = mkOption {
      type = types.port;
      default = 10283;
      description = "TCP port to serve /metrics on.";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Whether to open `port` in the firewall.";
    };

    units = mkOption {
      type = types.listOf types.str;
      default = [
        "immich-server.service"
        "immich-machine-learning.service"
        "nvidia-container-toolkit-cdi-generator.service"
        "postgresql.service"
        "redis-immich.service"
      ];
      description = "systemd units whose state, restarts and tuning (Nice, LimitMEMLOCK, devices) are exported.";
    };

    journalUnits = mkOption {
      type = types.listOf types.str;
      default = [ "immich-machine-learning.service" ];
      description = "The ML unit(s) whose journal holds the execution-provider and CPU-fallback lines.";
    };

    immichUrl = mkOption {
      type = types.str;
      default = "http://localhost:${toString (config.services.immich.port or 2283)}";
      defaultText = lib.literalExpression ''"http://localhost:''${toString config.services.immich.port}"'';
      description = "URL of the Immich server (job queues).";
    };

    mlUrl = mkOption {
      type = types.str;
      # nixpkgs' services.immich hard-codes the ML service to localhost:3003.
      default = "http://localhost:3003";
      description = "URL of the Immich machine-learning service.";
    };

    role = mkOption {
      type = types.enum [ "all" "ml" "server" ];
      default = "all";
      description = ''
        What this host runs when the ML service is on another machine (Immich's remote machine
        learning; docs/remote-ml.md): "all" (server and ML here), "ml" (the GPU host: the Immich API
        collector is off by default), "server" (the server host: the provider that labels seconds per
        job comes from the ML host's exporter, remoteMlExporterUrls). Give both hosts' scrape targets
        the same `immich` label in Prometheus.
      '';
    };

    mlFailoverUrls = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "http://gpu2.lan:3003" ];
      description = "Further ML URLs, in the order of Immich's machineLearning.urls list after mlUrl.";
    };

    remoteMlExporterUrls = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "http://gpu.lan:10283/metrics" ];
      description = ''
        /metrics URL of the exporter on each ML host (role "server"), in the order of mlUrl and
        mlFailoverUrls; one URL serves all of them when there is one ML host.
      '';
    };

    apiKeyFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/immich-gpu-exporter-api-key";
      description = ''
        File with an Immich admin API key (permissions queue.read and job.read), for the job-queue
        metrics. It is read by systemd (LoadCredential=), so it can stay root-only (0600) and
        outside the Nix store (agenix, sops-nix). Without it the queue collector reports itself down.
      '';
    };

    probe = {
      interval = mkOption {
        type = types.ints.unsigned;
        default = 0;
        example = 600;
        description = ''
          Seconds between two synthetic Smart Searches through the API (0: off). For servers without
          telemetry; it keeps the textual model loaded and holds its GPU memory (docs/probe.md).
        '';
      };
      keyFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/run/secrets/immich-probe-key";
        description = ''
          File holding an Immich API key with only asset.read, for the probe (never the admin key).
          Read by systemd (LoadCredential=), like apiKeyFile.
        '';
      };
    };

    immichTelemetry = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Read the Immich server's telemetry on this host: the microservices process on port 8082 (exact
        job counters, ML call latency of jobs) and the API process on 8081 (Smart Search response time).
        The server must serve it with repository durations: IMMICH_TELEMETRY_INCLUDE=all, which
        services.immich-gpu.telemetry sets (docs/latency.md; `immich-gpu-exporter check` says what is
        missing).
      '';
    };

    webConfigFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/etc/immich-gpu-exporter/web-config.yml";
      description = ''
        Web config file in Prometheus exporter-toolkit's format (tls_server_config, basic_auth_users
        with bcrypt hashes; see deploy/web-config.example.yml and SECURITY.md) for TLS and basic auth
        on every endpoint. Read directly by the service user immich-gpu-exporter, so it and the key
        it names must be readable by that user and stay outside the Nix store (the key is a secret).
        Relative paths in it are relative to its directory. It is re-read when it changes and on
        `systemctl reload immich-gpu-exporter` (SIGHUP); an invalid file at start-up fails the start.
      '';
    };

    collectors = {
      processes = collectorOption "processes" "Immich's processes, their tuning, memory and CPU, with or without a GPU";
      nvml = collectorOption "NVML" "GPU memory and use per Immich process";
      systemd = collectorOption "systemd" "unit states and tuning over D-Bus";
      journal = collectorOption "journal" "ML execution provider and CPU fallback from the ML unit's journal";
      immich = collectorOption "Immich API" "job-queue backlogs and timings" // {
        default = cfg.role != "ml";
        defaultText = lib.literalExpression ''config.services.immich-gpu-exporter.role != "ml"'';
      };
    };

    extraGroups = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "docker" ];
      description = ''
        Supplementary groups besides systemd-journal. Only name groups that exist (a missing one
        fails the start with 216/GROUP). "docker" lets the exporter name containers but is
        root-equivalent.
      '';
    };

    extraFlags = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "--log.level=debug" "--gpu.pid-labels" ];
      description = "Extra command-line flags (see `immich-gpu-exporter --help`).";
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.probe.interval == 0 || cfg.probe.keyFile != null;
        message = "services.immich-gpu-exporter: probe.interval is set but probe.keyFile is not (a key with asset.read; docs/probe.md).";
      }
    ];

    # A static system user rather than DynamicUser=: dbus-daemon drops connections from uids it
    # cannot resolve (see the shipped unit); NixOS may run either dbus-daemon or dbus-broker.
    users.users.immich-gpu-exporter = {
      isSystemUser = true;
      group = "immich-gpu-exporter";
      description = "Immich GPU exporter";
    };
    users.groups.immich-gpu-exporter = { };

    networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall [ cfg.port ];

    systemd.services.immich-gpu-exporter = {
      description = "Immich GPU exporter for Prometheus";
      wantedBy = [ "multi-user.target" ];
      after = [ "network.target" "nvidia-persistenced.service" "nvidia-container-toolkit-cdi-generator.service" ];
      serviceConfig = {
        Type = "exec";
        ExecStart = execStart;
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        Restart = "on-failure";
        RestartSec = "5s";

        User = "immich-gpu-exporter";
        Group = "immich-gpu-exporter";
        SupplementaryGroups = [ "systemd-journal" ] ++ cfg.extraGroups;

        StateDirectory = "immich-gpu-exporter";
        StateDirectoryMode = "0700";
        LoadCredential = lib.optional (cfg.apiKeyFile != null) "immich-api-key:${cfg.apiKeyFile}"
          ++ lib.optional (cfg.probe.interval > 0 && cfg.probe.keyFile != null) "immich-probe-key:${cfg.probe.keyFile}";

        DevicePolicy = "closed";
        DeviceAllow = [ "char-nvidia* rw" "/dev/nvidiactl rw" "/dev/nvidia-uvm rw" ];

        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateMounts = true;
        UMask = "0077";
        ProtectProc = "default";
        ProcSubset = "all";
        ProtectControlGroups = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectClock = true;
        ProtectHostname = true;

        NoNewPrivileges = true;
        CapabilityBoundingSet = "";
        AmbientCapabilities = "";
        RestrictSUIDSGID = true;
        LockPersonality = true;
        RestrictRealtime = true;
        RestrictNamespaces = true;
        PrivateIPC = true;
        KeyringMode = "private";
        RemoveIPC = true;
        MemoryDenyWriteExecute = true;

        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" "~@privileged @resources" ];
        SystemCallErrorNumber = "EPERM";
        RestrictAddressFamilies = "AF_UNIX AF_INET AF_INET6";
      };
    };
  };
}
