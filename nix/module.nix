# NixOS module: services.berth.
#
#   services.berth = {
#     enable = true;
#     components = [ "watcher" "listener" "manager" "builder" "agent" "edge" "api" ];
#     settings = { BERTH_GIT_URL = "https://git.example.com/ops/apps.git"; BERTH_EDGE_LISTEN = "0.0.0.0:80"; };
#     environmentFile = "/run/secrets/berth.env";   # BERTH_API_TOKEN, BERTH_DATABASE_URL, ...
#   };
#
# One systemd unit runs the chosen components. Its sandbox fits them: a unit with neither
# the builder nor the agent (control plane, edge) runs as a dynamic user with a strict
# sandbox; builder and agent need the Docker socket (and the agent starts programs), so
# those units keep access to the system.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.berth;
  needsDocker = lib.any (c: lib.elem c [ "builder" "agent" ]) cfg.components;
  bindsLowPorts = lib.elem "edge" cfg.components;
in {
  options.services.berth = {
    enable = lib.mkEnableOption "berth, a declarative deployment reconciler";
    package = lib.mkOption {
      type = lib.types.package;
      description = "The berth package.";
    };
    components = lib.mkOption {
      type = lib.types.listOf (lib.types.enum [ "watcher" "listener" "manager" "builder" "agent" "edge" "api" ]);
      default = [ "watcher" "listener" "manager" "builder" "agent" "edge" "api" ];
      description = "The components this host runs (berth up --components).";
    };
    settings = lib.mkOption {
      type = lib.types.attrsOf lib.types.str;
      default = { };
      example = { BERTH_SPECS = "/etc/berth/apps"; BERTH_EDGE_LISTEN = "0.0.0.0:80"; };
      description = "BERTH_* settings, rendered to the unit's environment. Secrets go in environmentFile.";
    };
    environmentFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      description = "A file of VAR=value lines for secrets (BERTH_API_TOKEN, BERTH_DATABASE_URL, BERTH_GIT_WEBHOOK_SECRET).";
    };
  };

  config = lib.mkIf cfg.enable {
    virtualisation.docker.enable = lib.mkIf needsDocker (lib.mkDefault true);
    systemd.services.berth = {
      description = "berth (${lib.concatStringsSep ", " cfg.components})";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" ] ++ lib.optional needsDocker "docker.service";
      wants = [ "network-online.target" ] ++ lib.optional needsDocker "docker.service";
      path = [ pkgs.git pkgs.postgresql pkgs.nats-server ];
      environment = {
        BERTH_COMPONENTS = lib.concatStringsSep "," cfg.components;
        BERTH_DATA_DIR = "/var/lib/berth";
      } // cfg.settings;
      serviceConfig = {
        ExecStart = "${cfg.package}/bin/berth up";
        Restart = "always";
        RestartSec = 2;
        TimeoutStopSec = 45;
        StateDirectory = "berth";
        LimitNOFILE = 1048576;
        EnvironmentFile = lib.mkIf (cfg.environmentFile != null) cfg.environmentFile;
        # Agents leave their exec instances running across restarts (the next agent restarts them).
        KillMode = if lib.elem "agent" cfg.components then "process" else "mixed";
        PrivateTmp = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
      } // lib.optionalAttrs (!needsDocker) {
        DynamicUser = true;
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateDevices = true;
        ProtectControlGroups = true;
        RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" ];
        RestrictNamespaces = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" ];
        CapabilityBoundingSet = if bindsLowPorts then [ "CAP_NET_BIND_SERVICE" ] else [ "" ];
        AmbientCapabilities = lib.mkIf bindsLowPorts [ "CAP_NET_BIND_SERVICE" ];
      } // lib.optionalAttrs needsDocker {
        ProtectHome = "read-only";
      };
    };
  };
}
