package archtest

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// room is one row of docs/architecture.md's rooms table.
type room struct {
	pattern string   // "agent", "internal/..."
	imports []string // patterns it may import
	line    int
}

// matches reports whether the package rel is named by pattern, and how
// specifically (the pattern's length; exact names beat "x/...").
func matches(pattern, rel string) (bool, int) {
	if base, ok := strings.CutSuffix(pattern, "/..."); ok {
		return under(rel, base), len(base)
	}
	return pattern == rel, len(pattern) + 1000
}

func matchesAny(patterns []string, rel string) bool {
	for _, p := range patterns {
		if ok, _ := matches(p, rel); ok {
			return true
		}
	}
	return false
}

var codeSpan = regexp.MustCompile("`([^`]+)`")

// readRooms parses the rooms table: the first table after "## Rooms".
func readRooms(t *testing.T) []room {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "docs", "architecture.md"))
	if err != nil {
		t.Fatal(err)
	}
	var rooms []room
	inRooms := false
	for i, line := range strings.Split(string(b), "\n") {
		switch {
		case strings.HasPrefix(line, "## "):
			inRooms = line == "## Rooms"
			continue
		case !inRooms || !strings.HasPrefix(line, "| `"):
			continue
		}
		cells := strings.Split(strings.Trim(line, "|"), "|")
		if len(cells) != 3 {
			t.Fatalf("docs/architecture.md:%d: a room row has three cells (room, owns, may import): %s", i+1, line)
		}
		r := room{pattern: strings.Trim(strings.TrimSpace(cells[0]), "`"), line: i + 1}
		for _, m := range codeSpan.FindAllStringSubmatch(cells[2], -1) {
			r.imports = append(r.imports, m[1])
		}
		rooms = append(rooms, r)
	}
	if len(rooms) < 10 {
		t.Fatalf("docs/architecture.md: found %d rooms; is the table under \"## Rooms\"?", len(rooms))
	}
	return rooms
}

// roomOf is the most specific room naming rel.
func roomOf(rooms []room, rel string) (room, bool) {
	best, score := room{}, -1
	for _, r := range rooms {
		if ok, s := matches(r.pattern, rel); ok && s > score {
			best, score = r, s
		}
	}
	return best, score >= 0
}

// Every package is in a room of docs/architecture.md, every room names a
// package that exists, and every package imports only what its room may.
func TestImportsFollowTheRooms(t *testing.T) {
	rooms := readRooms(t)
	pkgs := listPackages(t)
	used := map[string]bool{}
	for _, p := range pkgs {
		r, ok := roomOf(rooms, p.rel())
		if !ok {
			t.Errorf("%s is in no room of docs/architecture.md: add it to the rooms table", p.rel())
			continue
		}
		used[r.pattern] = true
		for _, imp := range ours(p.Imports) {
			if !matchesAny(r.imports, imp) {
				t.Errorf("%s imports %s, which its room (docs/architecture.md:%d, %s) may not import", p.rel(), imp, r.line, r.pattern)
			}
		}
	}
	for _, r := range rooms {
		if !used[r.pattern] {
			t.Errorf("docs/architecture.md:%d: room %s names no package", r.line, r.pattern)
		}
	}
}

// The rules of "Who may import whom", on the whole dependency graph.
func TestWhoMayImportWhom(t *testing.T) {
	pkgs := listPackages(t)
	depsOn := func(p pkg, dirs ...string) []string {
		var out []string
		for _, d := range ours(p.Deps) {
			for _, dir := range dirs {
				if under(d, dir) {
					out = append(out, d)
				}
			}
		}
		return out
	}
	madeForTests := func(rel string) bool {
		return strings.HasSuffix(rel, "test") && !strings.HasPrefix(rel, "devtools/archtest")
	}
	for _, p := range pkgs {
		rel := p.rel()
		if product(p) {
			// 1. The product never links the emulator or test support.
			if bad := depsOn(p, "azsim", "devtools"); len(bad) > 0 {
				t.Errorf("product package %s links %v: the product never links the emulator or test support", rel, bad)
			}
			for _, d := range ours(p.Deps) {
				if madeForTests(d) {
					t.Errorf("product package %s links %s, a package made for tests", rel, d)
				}
			}
		}
		// 2. Test support links the emulator only where it tests against it.
		if testSupport(p) && rel != "azsim/azsimtest" && rel != "devtools/bench" {
			if bad := depsOn(p, "azsim"); len(bad) > 0 {
				t.Errorf("test support %s links the emulator (%v) without testing against it", rel, bad)
			}
		}
		// 3. The libraries never depend on the agent or its pipelines.
		if under(rel, "keystore") || rel == "provisioning" || rel == "transport" {
			if bad := depsOn(p, "agent", "telemetry", "renewal"); len(bad) > 0 {
				t.Errorf("library %s depends on %v", rel, bad)
			}
		}
		// 4. The pipelines stay apart from the session and each other.
		if under(rel, "telemetry") {
			if bad := depsOn(p, "transport", "renewal"); len(bad) > 0 {
				t.Errorf("%s depends on %v: the hub session reaches the pipeline only as a Publisher", rel, bad)
			}
		}
		if rel == "renewal" {
			if bad := depsOn(p, "telemetry"); len(bad) > 0 {
				t.Errorf("renewal depends on %v", bad)
			}
		}
		// 5. The agent's parts are imported only by the agent (and each other).
		for _, imp := range ours(p.Imports) {
			agentPart := under(imp, "agent") && imp != "agent" || under(imp, "telemetry") || imp == "renewal"
			if agentPart && !(under(rel, "agent") || under(rel, "telemetry") || rel == "renewal") {
				t.Errorf("%s imports %s, one of the agent's own parts", rel, imp)
			}
		}
		// 6. The leaves depend on nothing of ours outside internal/.
		if under(rel, "internal") {
			for _, d := range ours(p.Deps) {
				if !under(d, "internal") {
					t.Errorf("leaf %s depends on %s", rel, d)
				}
			}
		}
	}
	if !slices.ContainsFunc(pkgs, func(p pkg) bool { return p.rel() == "azsim/azsimtest" }) {
		t.Fatal("azsim/azsimtest not found: the rules above checked nothing")
	}
}
