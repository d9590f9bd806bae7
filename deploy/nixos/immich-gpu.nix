# services.immich-gpu: the GPU part of the Immich guide, done so that it has an effect.
#
# It sits on top of nixpkgs' services.immich and only adds to it:
#   - the NVIDIA device nodes, through services.immich.accelerationDevices (nixpkgs otherwise
#     runs both Immich units with PrivateDevices=yes, which hides every GPU);
#   - LimitMEMLOCK=infinity for the ML unit (CUDA pins host memory for transfers);
#   - Nice for both units (ML first: it serves interactive smart search);
#   - ordering after nvidia-container-toolkit-cdi-generator.service when the toolkit is enabled
#     (After= only: the native ML service opens /dev/nvidia* itself and does not need CDI, so
#     Requires= would only add a way to fail);
#   - the cache directory with owner immich and mode 0750, plus MPLCONFIGDIR inside it (nixpkgs
#     sets no MPLCONFIGDIR, so matplotlib warns and uses a throw-away /tmp directory each start);
#   - MACHINE_LEARNING_DEVICE_ID (nixpkgs starts gunicorn without Immich's gunicorn_conf.py, so
#     MACHINE_LEARNING_DEVICE_IDS is ignored there);
#   - COLUMNS, so Rich does not wrap ML log lines at 80 columns into several journal entries
#     (the exporter reads the provider lines from that journal);
#   - PYTHONUNBUFFERED=1, as Immich's Docker image sets it, so the ML service's stdout reaches the
#     journal when it is written (see the comment at the setting);
#   - the guide's fail-fast assertions.
#
# What it deliberately does NOT set, because Immich ignores it:
#   - ONNXRUNTIME_PROVIDER: no such variable exists in Immich or ONNX Runtime. Immich picks the
#     execution provider from the onnxruntime build it runs with (CUDA needs an onnxruntime built
#     with cudaSupport) and logs it; the exporter's immich_ml_execution_provider shows which.
#   - a TensorRT cache path (TENSORRT_CACHE_PATH): Immich does not use the TensorRT provider and
#     reads no such variable.
# Setting either in services.immich(.machine-learning).environment produces a warning.
{ config, lib, ... }:

let
  cfg = config.services.immich-gpu;
  immich = config.services.immich;
  inherit (lib) mkOption mkEnableOption mkIf types;

  # nixpkgs' ML unit has CacheDirectory=immich and MACHINE_LEARNING_CACHE_FOLDER=/var/cache/immich.
  cacheRoot = "/var/cache/immich";
  mlEnv = immich.machine-learning.environment;
  cacheFolder = mlEnv.MACHINE_LEARNING_CACHE_FOLDER or cacheRoot;

  ineffective = {
    ONNXRUNTIME_PROVIDER = "no such setting exists; the execution provider follows the onnxruntime build (CUDA needs onnxruntime with cudaSupport)";
    TENSORRT_CACHE_PATH = "Immich does not use the TensorRT execution provider";
    MACHINE_LEARNING_DEVICE_IDS = "nixpkgs starts gunicorn without gunicorn_conf.py; set services.immich-gpu.deviceId (MACHINE_LEARNING_DEVICE_ID)";
  };
  ineffectiveIn = where: env:
    lib.mapAttrsToList (name: why: "services.immich-gpu: ${where}.${name} has no effect: ${why}.")
      (lib.filterAttrs (name: _: env ? ${name}) ineffective);

  # mediaLocation is types.path, which also accepts a path literal (/srv/photos), not only a string.
  isAbsolute = p: (builtins.isString p || builtins.isPath p) && lib.hasPrefix "/" (toString p);

  # nixpkgs loads the NVIDIA driver for "nvidia" in services.xserver.videoDrivers or for
  # hardware.nvidia.datacenter.enable (data-center drivers; nixpkgs forbids setting both).
  nvidiaDriver = lib.elem "nvidia" config.services.xserver.videoDrivers || config.hardware.nvidia.datacenter.enable;
in
{
  options.services.immich-gpu = {
    enable = mkEnableOption "NVIDIA CUDA setup for services.immich (devices, limits, caches, assertions)";

    gpuDeviceNodes = mkOption {
      type = types.listOf types.str;
      default = [ "/dev/nvidia0" ];
      example = [ "/dev/nvidia0" "/dev/nvidia1" ];
      description = ''
        The /dev/nvidiaN nodes of the GPUs Immich may use (`ls /dev/nvidia[0-9]*`). The control
        nodes (/dev/nvidiactl, /dev/nvidia-uvm, /dev/nvidia-uvm-tools, /dev/nvidia-modeset) are
        always added. Both Immich units get them: nixpkgs applies accelerationDevices to both.
        Other devices (say /dev/dri/renderD128 for transcoding) go into
        services.immich.accelerationDevices as usual; the lists merge. Do not set that option to
        null ("all devices") with this module: its type, null or a list, rejects a null defined
        next to a list.
      '';
    };

    deviceId = mkOption {
      type = types.ints.unsigned;
      default = 0;
      description = "CUDA device ordinal for the ML service (MACHINE_LEARNING_DEVICE_ID).";
    };

    memlock = mkOption {
      type = types.bool;
      default = true;
      description = "Whether to set LimitMEMLOCK=infinity on the ML unit (CUDA pinned host memory).";
    };

    mlNice = mkOption {
      type = types.nullOr (types.ints.between (-20) 19);
      default = -10;
      description = "Nice value of immich-machine-learning.service (null leaves it alone).";
    };

    serverNice = mkOption {
      type = types.nullOr (types.ints.between (-20) 19);
      default = -5;
      description = "Nice value of immich-server.service (null leaves it alone).";
    };

    logColumns = mkOption {
      type = types.ints.positive;
      default = 512;
      description = ''
        COLUMNS for the ML service. Rich wraps log records at this width and pads every line
        with spaces up to it, so it is a trade-off: wide enough that provider and model lines
        stay on one journal entry, narrow enough not to store kilobytes of padding per line.
      '';
    };

    requireContainerToolkit = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Whether to insist on hardware.nvidia-container-toolkit.enable (set it when Immich or its
        ML service runs in a container on this host and gets the GPU through CDI).
      '';
    };

    telemetry = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Whether to turn on the Immich server's own telemetry (IMMICH_TELEMETRY_INCLUDE=all, as a
        default a user's own value overrides): job counters and the repository durations that give
        Smart Search response time and ML call latency (docs/latency.md). The server then serves
        Prometheus text on ports 8081 (API) and 8082 (microservices) on all interfaces; NixOS' firewall
        keeps them closed unless you open them. Pair with services.immich-gpu-exporter.immichTelemetry.
      '';
    };

    requirePostgresql = mkOption {
      type = types.bool;
      default = true;
      description = "Whether to insist on a local PostgreSQL (services.postgresql.enable), as the guide does.";
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = immich.enable && immich.machine-learning.enable;
        message = "services.immich-gpu: needs services.immich.enable and services.immich.machine-learning.enable.";
      }
      {
        assertion = config.hardware.graphics.enable;
        message = "services.immich-gpu: GPU infrastructure is off; set hardware.graphics.enable = true.";
      }
      {
        assertion = nvidiaDriver;
        message = ''services.immich-gpu: supports NVIDIA only; set services.xserver.videoDrivers = [ "nvidia" ] (this loads the NVIDIA driver, also on headless hosts) or, for data-center GPUs, hardware.nvidia.datacenter.enable = true.'';
      }
      {
        assertion = cfg.requireContainerToolkit -> config.hardware.nvidia-container-toolkit.enable;
        message = "services.immich-gpu: requireContainerToolkit is set but hardware.nvidia-container-toolkit.enable is false.";
      }
      {
        assertion = isAbsolute immich.mediaLocation && isAbsolute cacheFolder;
        message = "services.immich-gpu: storage paths must be absolute: services.immich.mediaLocation and MACHINE_LEARNING_CACHE_FOLDER.";
      }
      {
        assertion = cfg.requirePostgresql -> (immich.database.enable && config.services.postgresql.enable);
        message = "services.immich-gpu: PostgreSQL is not enabled (services.immich.database.enable / services.postgresql.enable); set requirePostgresql = false for a remote database.";
      }
    ];

    warnings =
      ineffectiveIn "services.immich.machine-learning.environment" mlEnv
      ++ ineffectiveIn "services.immich.environment" immich.environment;

    services.immich.environment = mkIf cfg.telemetry { IMMICH_TELEMETRY_INCLUDE = lib.mkDefault "all"; };

    services.immich.accelerationDevices =
      [ "/dev/nvidiactl" "/dev/nvidia-uvm" "/dev/nvidia-uvm-tools" "/dev/nvidia-modeset" ] ++ cfg.gpuDeviceNodes;

    services.immich.machine-learning.environment = {
      MACHINE_LEARNING_DEVICE_ID = toString cfg.deviceId;
      # cacheRoot, not MACHINE_LEARNING_CACHE_FOLDER: reading this attribute set while defining it
      # would recurse; nixpkgs' CacheDirectory=immich guarantees that cacheRoot exists.
      # mkDefault: the environment is a freeform set of strings, where two different values at the
      # same priority are an evaluation error; a user's own MPLCONFIGDIR simply wins.
      MPLCONFIGDIR = lib.mkDefault "${cacheRoot}/matplotlib";
      COLUMNS = toString cfg.logColumns;
      # nixpkgs' wrapper execs gunicorn without it, so Python block-buffers stdout into the journal.
      # ONNX Runtime prints its "EP Error ... Falling back to ['CPUExecutionProvider']" block with
      # print() to stdout: buffered, it reaches the journal only with the worker's next log line, and
      # for a worker's last model load that is its idle shutdown or `systemctl stop`, hours later.
      # The exporter judges from ORT's unbuffered stderr lines first (docs/journal.md), but a fallback
      # whose only trace is that block (e.g. out of GPU memory while creating a session) would stay
      # unseen for that long. mkDefault: a user's own value wins.
      PYTHONUNBUFFERED = lib.mkDefault "1";
    };

    systemd.services.immich-machine-learning = {
      after = lib.optional config.hardware.nvidia-container-toolkit.enable "nvidia-container-toolkit-cdi-generator.service";
      serviceConfig = {
        LimitMEMLOCK = mkIf cfg.memlock "infinity";
        Nice = mkIf (cfg.mlNice != null) cfg.mlNice;
        # systemd creates CacheDirectory= with 0755 unless told otherwise.
        CacheDirectoryMode = "0750";
      };
    };

    systemd.services.immich-server = {
      after = lib.optional config.hardware.nvidia-container-toolkit.enable "nvidia-container-toolkit-cdi-generator.service";
      serviceConfig.Nice = mkIf (cfg.serverNice != null) cfg.serverNice;
    };

    # Owner and mode of the cache tree, also for caches created before this module was enabled.
    systemd.tmpfiles.rules = [
      "d ${cacheRoot} 0750 ${immich.user} ${immich.group} -"
      "d ${cacheRoot}/matplotlib 0750 ${immich.user} ${immich.group} -"
    ];
  };
}
