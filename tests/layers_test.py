"""No module of ddpm_jax imports from a layer above its own: the package's one-way flow."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).parents[1] / "ddpm_jax"

# The layers, bottom to top, each by its module prefixes: a module may import its own
# layer and the layers below it. The math keeps its place at the top of the package.
LAYERS = (
    ("runtime", ("ddpm_jax.runtime",)),
    ("models", ("ddpm_jax.models",)),
    ("math", ("ddpm_jax.schedules", "ddpm_jax.diffusion", "ddpm_jax.likelihood",
              "ddpm_jax.dpm_solver", "ddpm_jax.sampling")),
    ("data", ("ddpm_jax.data",)),
    ("evaluation", ("ddpm_jax.evaluation",)),
    ("config", ("ddpm_jax.config_validation",)),
    ("training", ("ddpm_jax.training",)),
)


def layer_of(module: str):
    """The index of `module`'s layer in LAYERS, or None if no layer holds it."""
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None


def imports_of(source: str):
    """(line, module) of every ddpm_jax module that `source` imports, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("ddpm_jax")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.startswith("ddpm_jax"):
            for alias in node.names:  # `from ddpm_jax.x import y`: y may be a module or a name
                candidate = f"{node.module}.{alias.name}"
                found.append((node.lineno, candidate if layer_of(candidate) is not None
                              else node.module))
    return found


def upward_imports(module: str, source: str):
    own = layer_of(module)
    return [f"{module}:{line} imports {imported} ({LAYERS[layer_of(imported)][0]} is above "
            f"{LAYERS[own][0]})" for line, imported in imports_of(source)
            if layer_of(imported) is not None and layer_of(imported) > own]


def package_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path.read_text()


def test_every_module_has_a_layer():
    unplaced = [m for m, _ in package_modules() if m != "ddpm_jax" and layer_of(m) is None]
    assert not unplaced, f"modules in no layer of LAYERS: {unplaced}"


def test_no_module_imports_a_layer_above_its_own():
    upward = [line for module, source in package_modules() if module != "ddpm_jax"
              for line in upward_imports(module, source)]
    assert not upward, "\n".join(upward)


def test_an_upward_import_is_found_in_a_function_too():
    source = "from ddpm_jax.runtime import storage\n\ndef f():\n    from ddpm_jax.data import datasets\n"
    assert upward_imports("ddpm_jax.models.unet", source) == [
        "ddpm_jax.models.unet:4 imports ddpm_jax.data.datasets (data is above models)"]
    assert upward_imports("ddpm_jax.training.loop", source) == []
