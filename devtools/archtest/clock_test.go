package archtest

import (
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// wallClock are the time functions that read the wall clock or make a
// timer on it. Product code takes them from a clock.Clock instead (the
// agent's Options.Clock, a part's Deps.Clock), so that tests drive every
// schedule, wait, interval and certificate date on a fake clock.
var wallClock = map[string]bool{
	"Now": true, "Since": true, "Until": true, "NewTimer": true, "NewTicker": true,
	"After": true, "AfterFunc": true, "Tick": true, "Sleep": true,
}

// Where the wall clock is right, and why. Keep this short.
var (
	// clockPackage is the one that wraps the wall clock (clock.Real).
	clockPackage = "internal/clock"
	// netDeadlineCalls take a net.Conn (or WebSocket) deadline: the kernel
	// keeps those in wall time, so time.Now() in their arguments is right.
	netDeadlineCalls = map[string]bool{"SetDeadline": true, "SetReadDeadline": true, "SetWriteDeadline": true, "WriteControl": true}
	// wallFiles may use the wall clock throughout, for the reason given.
	wallFiles = map[string]string{
		"provisioning/dpshttpconn.go": "an HTTP exchange's deadline is a net.Conn deadline, set and then judged (was it the deadline that ended the read?) in wall time",
	}
)

// Bounds on network I/O are context.WithTimeout (wall time: a fake clock
// that leaps to its next deadline must not time out a TLS handshake in
// progress); they are not in wallClock's list.

// wallClockUses lists, for one file, every use of a wallClock function of
// package time that the rules above do not allow, as "file:line: time.X".
func wallClockUses(fset *token.FileSet, f *ast.File, name string) []string {
	timeName := ""
	for _, imp := range f.Imports {
		if p, _ := strconv.Unquote(imp.Path.Value); p == "time" {
			timeName = "time"
			if imp.Name != nil {
				timeName = imp.Name.Name
			}
		}
	}
	if timeName == "" || timeName == "_" {
		return nil
	}
	var found []string
	var inDeadline int
	var visit func(n ast.Node) bool
	visit = func(n ast.Node) bool {
		switch n := n.(type) {
		case *ast.CallExpr:
			if sel, ok := n.Fun.(*ast.SelectorExpr); ok && netDeadlineCalls[sel.Sel.Name] {
				ast.Inspect(n.Fun, visit)
				inDeadline++
				for _, a := range n.Args {
					ast.Inspect(a, visit)
				}
				inDeadline--
				return false
			}
		case *ast.SelectorExpr:
			if id, ok := n.X.(*ast.Ident); ok && id.Name == timeName && wallClock[n.Sel.Name] && inDeadline == 0 {
				found = append(found, fmt.Sprintf("%s:%d: time.%s", name, fset.Position(n.Pos()).Line, n.Sel.Name))
			}
		}
		return true
	}
	ast.Inspect(f, visit)
	return found
}

// Product code (everything but the emulator, devtools and the packages
// made for tests) never reads the wall clock or makes a timer on it itself:
// it goes through internal/clock. Test files are exempt (they may wait on
// real processes), and so are the allowed uses above.
func TestProductTimeComesFromTheClock(t *testing.T) {
	var bad []string
	files := 0
	for _, p := range listPackages(t) {
		if !product(p) || p.rel() == clockPackage {
			continue
		}
		for _, list := range [][]string{p.GoFiles, p.CgoFiles, p.IgnoredGoFiles} {
			for _, name := range list {
				if strings.HasSuffix(name, "_test.go") {
					continue
				}
				rel := filepath.ToSlash(filepath.Join(p.rel(), name))
				if _, ok := wallFiles[rel]; ok {
					continue
				}
				fset := token.NewFileSet()
				f, err := parser.ParseFile(fset, filepath.Join(p.Dir, name), nil, parser.SkipObjectResolution)
				if err != nil {
					t.Fatal(err)
				}
				files++
				bad = append(bad, wallClockUses(fset, f, rel)...)
			}
		}
	}
	if files < 50 {
		t.Fatalf("only %d product files scanned; is go list working?", files)
	}
	if len(bad) > 0 {
		t.Fatalf("product code uses the wall clock directly; take a clock.Clock (internal/clock) instead, or bound network I/O with a context:\n%s", strings.Join(bad, "\n"))
	}
}

// The scanner finds what it must and passes what it may: a check that
// found nothing because it looked at nothing would prove nothing.
func TestWallClockScanner(t *testing.T) {
	src := `package x
import (
	"net"
	tm "time"
)
var f = tm.Now
func g(c net.Conn) {
	c.SetDeadline(tm.Now().Add(tm.Second))
	<-tm.After(tm.Second)
	tm.Sleep(1)
	_ = tm.Duration(1)
	_ = tm.Since(tm.Time{})
}
`
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, "x.go", src, parser.SkipObjectResolution)
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Join(wallClockUses(fset, f, "x.go"), ",")
	want := "x.go:6: time.Now,x.go:9: time.After,x.go:10: time.Sleep,x.go:12: time.Since"
	if got != want {
		t.Fatalf("found %q, want %q", got, want)
	}
}
