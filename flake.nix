{
  description = "immich-gpu-exporter: Prometheus exporter that proves whether Immich really runs on the GPU";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      # x86_64 only: nixpkgs' nvidia-ml-py sets meta.platforms = [ "x86_64-linux" ], so the
      # package does not evaluate elsewhere without allowUnsupportedSystem.
      systems = [ "x86_64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (pkgs: rec {
        immich-gpu-exporter = pkgs.callPackage ./deploy/nixos/package.nix { };
        default = immich-gpu-exporter;
      });

      nixosModules = {
        immich-gpu-exporter = { pkgs, lib, ... }: {
          imports = [ ./deploy/nixos/module.nix ];
          # The flake's own build, so the module does not depend on the caller's overlays.
          services.immich-gpu-exporter.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        };
        immich-gpu = ./deploy/nixos/immich-gpu.nix;
        default = {
          imports = [ self.nixosModules.immich-gpu-exporter self.nixosModules.immich-gpu ];
        };
      };
    };
}
