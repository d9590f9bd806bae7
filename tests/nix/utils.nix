# A stand-in for the `utils` argument NixOS passes to every module (nixos/lib/utils.nix), reduced
# to what deploy/nixos/module.nix uses. Written from the documented contract of
# escapeSystemdExecArg: one argument as a double-quoted string in the C-escape syntax systemd
# reads in Exec*= lines (JSON's escapes are a subset of it), with `%` and `$` doubled so that
# systemd expands neither specifiers nor variables in it.
let
  lib = import ./lib.nix;
  escapeSystemdExecArg = arg:
    let
      s =
        if builtins.isString arg || builtins.isPath arg then "${arg}"
        else if builtins.isInt arg || builtins.isFloat arg then toString arg
        else throw "escapeSystemdExecArg: strings, paths and numbers only";
    in
    builtins.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON s);
in
{
  inherit escapeSystemdExecArg;
  escapeSystemdExecArgs = args: lib.concatStringsSep " " (map escapeSystemdExecArg args);
}
