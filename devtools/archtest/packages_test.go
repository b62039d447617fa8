package archtest

import (
	"encoding/json"
	"io"
	"os/exec"
	"strings"
	"testing"
)

// module is gwagent's module path.
const module = "github.com/gwagent/gwagent"

// pkg is what go list says of one of the module's packages.
type pkg struct {
	ImportPath     string
	Name           string
	Dir            string
	GoFiles        []string
	CgoFiles       []string
	IgnoredGoFiles []string // other build flavours (nopkcs11, !cgo)
	Imports        []string
	Deps           []string
	TestImports    []string
	XTestImports   []string
}

// rel is the package's path inside the module ("" for the root).
func (p pkg) rel() string { return strings.TrimPrefix(strings.TrimPrefix(p.ImportPath, module), "/") }

// listPackages runs go list -deps over the module (from the module's root,
// whatever the test's directory) and returns its own packages.
func listPackages(t *testing.T) []pkg {
	t.Helper()
	cmd := exec.Command("go", "list", "-e", "-json", module+"/...")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	var pkgs []pkg
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for {
		var p pkg
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		pkgs = append(pkgs, p)
	}
	if len(pkgs) < 20 {
		t.Fatalf("go list found only %d packages", len(pkgs))
	}
	return pkgs
}

// ours keeps the module's own packages of a list of import paths, relative.
func ours(paths []string) []string {
	var out []string
	for _, p := range paths {
		if p == module || strings.HasPrefix(p, module+"/") {
			out = append(out, strings.TrimPrefix(strings.TrimPrefix(p, module), "/"))
		}
	}
	return out
}

// under reports whether rel is dir or inside it.
func under(rel, dir string) bool { return rel == dir || strings.HasPrefix(rel, dir+"/") }

// testSupport: packages that exist for tests (azsimtest, keystoretest) and
// the developer tools; product code never links them.
func testSupport(p pkg) bool {
	return under(p.rel(), "devtools") || strings.HasSuffix(p.Name, "test")
}

// emulator: azsim and its CLI.
func emulator(p pkg) bool { return under(p.rel(), "azsim") || p.rel() == "cmd/azsim" }

// product: what ships in gwagent's binary or could (everything else).
func product(p pkg) bool { return !testSupport(p) && !emulator(p) }
