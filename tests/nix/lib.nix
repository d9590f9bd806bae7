# A minimal stand-in for the parts of nixpkgs' `lib` that deploy/nixos/*.nix use, so the
# modules can be evaluated offline (nixpkgs is not available here). It follows the documented
# semantics of the real functions (mkIf/mkMerge/mkOverride discharge, option priorities, type
# checks, "option does not exist" errors); it is written from those semantics, not copied.
# Anything a module uses that is missing here fails the evaluation loudly, which is the point.
let
  inherit (builtins)
    all any attrNames concatLists concatStringsSep elem filter foldl' genList head isAttrs isBool
    isFunction isInt isList isPath isString length listToAttrs map match substring stringLength tail
    toJSON;

  isType = t: v: isAttrs v && (v._type or null) == t;
  showPath = path: concatStringsSep "." path;
  minList = l: foldl' (a: b: if b < a then b else a) (head l) l;

  # --- properties ---------------------------------------------------------------------------
  mkIf = condition: content: { _type = "if"; inherit condition content; };
  mkMerge = contents: { _type = "merge"; inherit contents; };
  mkOverride = priority: content: { _type = "override"; inherit priority content; };
  mkDefault = mkOverride 1000;
  mkForce = mkOverride 50;
  mkOptionDefault = mkOverride 1500;

  # One definition -> the plain definitions it stands for, with priorities (the top level only).
  discharge = def:
    let v = def.value; in
    if isType "if" v then
      (if !isBool v.condition then throw "mkIf called with a non-Boolean condition"
       else if v.condition then discharge (def // { value = v.content; }) else [ ])
    else if isType "merge" v then concatLists (map (c: discharge (def // { value = c; })) v.contents)
    else if isType "override" v then discharge (def // { value = v.content; priority = v.priority; })
    else [ def ];

  # Keep the definitions of the highest priority (lowest number), as the module system does.
  byPriority = defs:
    let
      plain = concatLists (map discharge defs);
      best = minList (map (d: d.priority) plain);
    in
    if plain == [ ] then [ ] else filter (d: d.priority == best) plain;

  # --- types ----------------------------------------------------------------------------------
  mkOptionType = { name, description ? name, check ? (_: true), merge ? mergeEqual }:
    { _type = "option-type"; inherit name description check merge; };

  mergeEqual = loc: defs:
    let first = (head defs).value; in
    if all (d: d.value == first) defs then first
    else throw "The option `${showPath loc}' has conflicting definition values: ${toJSON (map (d: d.value) defs)}";

  # Deep merge for free-form values (the stub of systemd.services and friends): attribute sets
  # merge per name, lists concatenate, anything else must agree.
  mergeAnything = loc: defs:
    let
      values = map (d: d.value) defs;
    in
    if all isAttrs values && !(any (v: v ? _type) values) then
      let names = lib.unique (concatLists (map attrNames values)); in
      listToAttrs (concatLists (map
        (n:
          let sub = byPriority (concatLists (map (d: if d.value ? ${n} then [ (d // { value = d.value.${n}; }) ] else [ ]) defs)); in
          if sub == [ ] then [ ] else [ { name = n; value = mergeAnything (loc ++ [ n ]) sub; } ])
        names))
    else if all isList values then concatLists values
    else mergeEqual loc defs;

  checkedElems = elemType: loc: defs:
    map (d:
      if elemType.check d.value then d
      else throw "A definition for option `${showPath loc}' is not of type `${elemType.description}': ${toJSON d.value}")
      defs;

  types = rec {
    anything = mkOptionType { name = "anything"; merge = mergeAnything; };
    bool = mkOptionType { name = "bool"; description = "boolean"; check = isBool; };
    str = mkOptionType { name = "str"; description = "string"; check = isString; };
    int = mkOptionType { name = "int"; description = "signed integer"; check = isInt; };
    path = mkOptionType { name = "path"; check = v: isPath v || (isString v && lib.hasPrefix "/" v); };
    package = mkOptionType { name = "package"; check = v: isAttrs v || isString v; };
    # As in nixpkgs, port is ints.u16, whose description names its range.
    port = mkOptionType { name = "port"; description = "16 bit unsigned integer; between 0 and 65535 (both inclusive)"; check = v: isInt v && v >= 0 && v <= 65535; };
    ints = {
      between = lo: hi: mkOptionType {
        name = "intBetween";
        description = "integer between ${toString lo} and ${toString hi} (both inclusive)";
        check = v: isInt v && v >= lo && v <= hi;
      };
      unsigned = mkOptionType { name = "unsignedInt"; description = "unsigned integer"; check = v: isInt v && v >= 0; };
      positive = mkOptionType { name = "positiveInt"; description = "positive integer"; check = v: isInt v && v > 0; };
    };
    enum = values: mkOptionType {
      name = "enum";
      description = "one of ${concatStringsSep ", " (map toJSON values)}";
      check = v: elem v values;
    };
    listOf = elemType: mkOptionType {
      name = "listOf";
      description = "list of ${elemType.description}";
      check = isList;
      merge = loc: defs:
        concatLists (map (d: map (x: (head (checkedElems elemType loc [ { value = x; priority = d.priority; } ])).value) d.value) defs);
    };
    attrsOf = elemType: mkOptionType {
      name = "attrsOf";
      description = "attribute set of ${elemType.description}";
      check = isAttrs;
      merge = loc: defs:
        let names = lib.unique (concatLists (map (d: attrNames d.value) defs)); in
        listToAttrs (concatLists (map
          (n:
            let sub = byPriority (concatLists (map (d: if d.value ? ${n} then [ (d // { value = d.value.${n}; }) ] else [ ]) defs)); in
            if sub == [ ] then [ ] else [ { name = n; value = elemType.merge (loc ++ [ n ]) (checkedElems elemType (loc ++ [ n ]) sub); } ])
          names));
    };
    # Only the free-form use (`submodule { freeformType = ...; }`, as nixpkgs declares
    # services.immich.environment): definitions merge like the free-form type, and the value
    # carries no `_module`, as the real module system strips it.
    submodule = module:
      if !isAttrs module || attrNames module != [ "freeformType" ]
      then throw "the lib stand-in supports only submodule { freeformType = ...; }"
      else mkOptionType {
        name = "submodule";
        description = "submodule";
        check = isAttrs;
        merge = loc: defs: module.freeformType.merge loc (checkedElems module.freeformType loc defs);
      };
    nullOr = elemType: mkOptionType {
      name = "nullOr";
      description = "null or ${elemType.description}";
      check = v: v == null || elemType.check v;
      merge = loc: defs:
        let nulls = filter (d: d.value == null) defs; in
        if length nulls == length defs then null
        else if nulls != [ ] then throw "The option `${showPath loc}' is defined both null and not null"
        else elemType.merge loc defs;
    };
  };

  # --- options and modules --------------------------------------------------------------------
  mkOption = attrs: attrs // { _type = "option"; };
  mkEnableOption = name: mkOption {
    type = types.bool;
    default = false;
    example = true;
    description = "Whether to enable ${name}.";
  };
  literalExpression = text: { _type = "literalExpression"; inherit text; };

  isOption = isType "option";

  # Import closure of a module list; a module is a path, a function or an attribute set.
  normalise = args: m:
    let
      f = if isPath m || isString m then import m else m;
      v = if isFunction f then f args else f;
      key = if isPath m || isString m then toString m else null;
    in
    if v ? options || v ? config || v ? imports then
      { inherit key; imports = v.imports or [ ]; options = v.options or { }; config = v.config or { }; }
    else
      { inherit key; imports = v.imports or [ ]; options = { }; config = removeAttrs v [ "imports" ]; };

  collect = args: modules:
    concatLists (map (m: let n = normalise args m; in [ n ] ++ collect args n.imports) modules);

  # Deep union of the option declarations of all modules.
  mergeDecls = a: b:
    a // lib.mapAttrs (n: bv:
      if a ? ${n} then
        (if isOption bv || isOption a.${n} then throw "The option `${n}' is declared twice" else mergeDecls a.${n} bv)
      else bv) b;

  # Definitions of the option at `path` from one module's config. As in the module system, the
  # properties are pushed down to the option first and mkIf conditions are only evaluated there,
  # so `config = mkIf cfg.enable { ... }` may read options that the same module declares.
  defsAt = v: path: conds: prio:
    if isType "if" v then defsAt v.content path (conds ++ [ v.condition ]) prio
    else if isType "merge" v then concatLists (map (c: defsAt c path conds prio) v.contents)
    else if isType "override" v then defsAt v.content path conds v.priority
    else if path == [ ] then
      (if all (c: if isBool c then c else throw "mkIf called with a non-Boolean condition") conds
       then [ { value = v; priority = prio; } ] else [ ])
    else if isAttrs v && v ? ${head path} then defsAt v.${head path} (tail path) conds prio
    else [ ];

  # Every defined name must lead to a declared option ("The option `x' does not exist").
  checkDefined = decls: path: v:
    if isOption decls then true
    else if isType "if" v then checkDefined decls path v.content
    else if isType "merge" v then all (checkDefined decls path) v.contents
    else if isType "override" v then checkDefined decls path v.content
    else if isAttrs v then
      all (n:
        if path == [ ] && n == "_module" then true
        else if decls ? ${n} then checkDefined decls.${n} (path ++ [ n ]) v.${n}
        else throw "The option `${showPath (path ++ [ n ])}' does not exist.")
        (attrNames v)
    else throw "The option `${showPath path}' is not an option but an attribute set of options.";

  evalModules = { modules, specialArgs ? { } }:
    let
      args = specialArgs // { inherit lib config options; };
      all' = collect args modules;
      options = foldl' mergeDecls { } (map (m: m.options) all');
      valueOf = path: opt:
        let
          defs = byPriority (concatLists (map (m: defsAt m.config path [ ] 100) all'));
          checked = checkedElems opt.type path defs;
        in
        if defs == [ ] then
          (if opt ? default then opt.default else throw "The option `${showPath path}' is used but not defined.")
        else opt.type.merge path checked;
      build = path: decls:
        if isOption decls then valueOf path decls
        else lib.mapAttrs (n: d: build (path ++ [ n ]) d) decls;
      config = build [ ] options;
      defined = all (m: checkDefined options [ ] m.config) all';
    in
    { inherit options; config = if defined then config else throw "unreachable"; };

  # --- the plain helpers the modules use ------------------------------------------------------
  lib = {
    inherit mkIf mkMerge mkOverride mkDefault mkForce mkOptionDefault mkOption mkEnableOption
      literalExpression types evalModules mkOptionType;
    mapAttrs = builtins.mapAttrs;
    attrNames = builtins.attrNames;
    filterAttrs = pred: set: listToAttrs (concatLists (map (n: if pred n set.${n} then [ { name = n; value = set.${n}; } ] else [ ]) (attrNames set)));
    mapAttrsToList = f: set: map (n: f n set.${n}) (attrNames set);
    genAttrs = names: f: listToAttrs (map (n: { name = n; value = f n; }) names);
    optional = cond: x: if cond then [ x ] else [ ];
    optionals = cond: xs: if cond then xs else [ ];
    optionalString = cond: s: if cond then s else "";
    optionalAttrs = cond: set: if cond then set else { };
    concatStringsSep = concatStringsSep;
    concatMapStringsSep = sep: f: list: concatStringsSep sep (map f list);
    elem = elem;
    unique = foldl' (acc: x: if elem x acc then acc else acc ++ [ x ]) [ ];
    hasPrefix = pre: s: substring 0 (stringLength pre) s == pre;
    hasInfix = infix: s: match ".*${lib.escapeRegex infix}.*" s != null;
    escapeRegex = s: builtins.replaceStrings
      [ "\\" "." "*" "+" "?" "(" ")" "[" "]" "{" "}" "|" "^" "$" ]
      [ "\\\\" "\\." "\\*" "\\+" "\\?" "\\(" "\\)" "\\[" "\\]" "\\{" "\\}" "\\|" "\\^" "\\$" ] s;
    # Like nixpkgs: leave "safe" words alone, single-quote the rest.
    escapeShellArg = arg:
      let s = toString arg; in
      if match "[[:alnum:],._+:@%/-]+" s != null then s
      else "'${builtins.replaceStrings [ "'" ] [ "'\\''" ] s}'";
    escapeShellArgs = args: concatStringsSep " " (map lib.escapeShellArg args);
    getExe = pkg:
      if pkg ? meta.mainProgram then "${pkg}/bin/${pkg.meta.mainProgram}"
      else throw "getExe: package ${pkg.name or "?"} has no meta.mainProgram";
    "getExe'" = pkg: name: "${pkg}/bin/${name}";
    boolToString = b: if b then "true" else "false";
  };
in
lib
