package telemetry_test

import (
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// Every timer of the pipeline runs on its clock.Clock, so tests can drive
// them with clock.Fake: no non-test file of telemetry, its outbox or the
// directory watcher reads the wall clock or makes a timer of its own.
func TestNoWallClock(t *testing.T) {
	forbidden := map[string]bool{"Now": true, "Since": true, "Until": true, "NewTimer": true, "NewTicker": true,
		"After": true, "AfterFunc": true, "Tick": true, "Sleep": true}
	for _, dir := range []string{".", "outbox", filepath.Join("..", "internal", "dirwatch")} {
		ents, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range ents {
			name := e.Name()
			if !strings.HasSuffix(name, ".go") || strings.HasSuffix(name, "_test.go") {
				continue
			}
			fset := token.NewFileSet()
			f, err := parser.ParseFile(fset, filepath.Join(dir, name), nil, 0)
			if err != nil {
				t.Fatal(err)
			}
			timePkg := ""
			for _, imp := range f.Imports {
				if p, _ := strconv.Unquote(imp.Path.Value); p == "time" {
					timePkg = "time"
					if imp.Name != nil {
						timePkg = imp.Name.Name
					}
				}
			}
			ast.Inspect(f, func(n ast.Node) bool {
				sel, ok := n.(*ast.SelectorExpr)
				if !ok {
					return true
				}
				if x, ok := sel.X.(*ast.Ident); ok && timePkg != "" && x.Name == timePkg && forbidden[sel.Sel.Name] {
					t.Errorf("%s: time.%s: use the pipeline's clock.Clock", fset.Position(sel.Pos()), sel.Sel.Name)
				}
				return true
			})
		}
	}
}
