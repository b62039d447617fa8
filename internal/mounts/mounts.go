// Package mounts finds the mounted file system a path lives on, from the
// kernel's mount table (/proc/mounts), so that `gwagent check` can warn
// about mount options that cost every spool message (online discard) and
// the bench can name the file system it measured. A leaf: no state.
package mounts

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
)

// Mount is one line of the mount table.
type Mount struct {
	Source  string
	Point   string
	Type    string
	Options []string
}

// Has reports whether the mount has option opt ("discard", "ro").
func (m Mount) Has(opt string) bool { return slices.Contains(m.Options, opt) }

// String is "ext4 on / (rw,relatime)".
func (m Mount) String() string {
	return fmt.Sprintf("%s on %s (%s)", m.Type, m.Point, strings.Join(m.Options, ","))
}

// Table is the kernel's mount table.
const Table = "/proc/mounts"

// Of returns the mount that holds path (absolute, symbolic links already
// resolved) according to the table at table (Table on a live system).
func Of(table, path string) (Mount, error) {
	f, err := os.Open(table)
	if err != nil {
		return Mount{}, err
	}
	defer f.Close()
	return Find(f, path)
}

// Find returns the mount that holds path in a mount table in the format of
// /proc/mounts: the longest mount point above path, the last one listed
// when several are mounted on the same point (the one on top).
func Find(r io.Reader, path string) (Mount, error) {
	var best Mount
	found := false
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 4 {
			continue
		}
		m := Mount{Source: unescape(f[0]), Point: unescape(f[1]), Type: f[2], Options: strings.Split(f[3], ",")}
		if !under(path, m.Point) || (found && len(m.Point) < len(best.Point)) {
			continue
		}
		best, found = m, true
	}
	if err := sc.Err(); err != nil {
		return Mount{}, fmt.Errorf("reading the mount table: %w", err)
	}
	if !found {
		return Mount{}, fmt.Errorf("no mount in the mount table holds %s", path)
	}
	return best, nil
}

func under(path, point string) bool {
	return path == point || point == "/" || strings.HasPrefix(path, point+"/")
}

// unescape undoes the table's octal escapes (\040 for a space, \011 tab,
// \012 newline, \134 backslash).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
