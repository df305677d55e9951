"""docs/DESIGN.md names code as `file:line name`. Checks that each such line still holds the
name (exit 1 with the stale ones listed); with --fix, moves each reference to the line where
the name is defined now. Run from the repository root."""
import re, sys

REF = re.compile(r'`([0-9A-Za-z_]+\.(?:c|cu|h)):(\d+)(\s+)([A-Za-z_]\w*)')
_files = {}


def lines_of(path):
    if path not in _files:
        _files[path] = open(path).read().split('\n')
    return _files[path]


def definition_line(path, name):
    """1-based line where name is defined: a function (not a prototype), a struct, enum or typedef."""
    lines = lines_of(path)
    fn = re.compile(r'^(?:[A-Za-z_].*\b)?' + re.escape(name) + r'\s*\(')
    for i, l in enumerate(lines):
        if fn.match(l) and not l.rstrip().endswith(';') and not l.startswith('#'):
            return i + 1
    for p in (re.compile(r'^\s*(typedef\s+)?(struct|enum)\s+' + re.escape(name) + r'\b'),
              re.compile(r'^typedef .*\b' + re.escape(name) + r'\b'), re.compile(r'^\s*}\s*' + re.escape(name) + r'\s*;')):
        for i, l in enumerate(lines):
            if p.match(l):
                return i + 1
    return None


def main():
    doc_path = 'docs/DESIGN.md'
    doc = open(doc_path).read()
    stale, missing = [], []

    def fix(m):
        path, line, ws, name = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        where = definition_line(path, name)
        if where is None:
            missing.append(f'{path}:{line} {name}')
            return m.group(0)
        if where != line:
            stale.append(f'{path}:{line} {name} (now line {where})')
        return f'`{path}:{where}{ws}{name}'

    fixed, count = REF.subn(fix, doc)
    if '--fix' in sys.argv[1:]:
        open(doc_path, 'w').write(fixed)
    if missing:
        print('no definition found for: ' + ', '.join(missing))
        sys.exit(1)
    if stale and '--fix' not in sys.argv[1:]:
        print(f'{len(stale)} of {count} references in {doc_path} are stale (python3 tests/design_refs.py --fix): ' + '; '.join(stale))
        sys.exit(1)
    print(f'{doc_path}: {count} file:line references, each at its definition' + (f' ({len(stale)} moved)' if stale else ''))


if __name__ == '__main__':
    main()
