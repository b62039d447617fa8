package main

import (
	"bufio"
	"io"
	"os"
	"strings"
)

// The account lookups of gwagent check: the service user's and spool
// group's ids, and a file owner's name. They read /etc/passwd and
// /etc/group as os/user does in a CGO-free build (so, like it, they see no
// accounts that only NSS modules know), without its 14 KiB of the arm64
// binary (issue 22's own-code figure).
var passwdFile, groupFile = "/etc/passwd", "/etc/group"

// userID is the uid of the user name, false if there is none.
func userID(name string) (string, bool) { return colonLookup(passwdFile, 0, name, 2) }

// userName is the name of the user with uid, false if there is none.
func userName(uid string) (string, bool) { return colonLookup(passwdFile, 2, uid, 0) }

// groupID is the gid of the group name, false if there is none.
func groupID(name string) (string, bool) { return colonLookup(groupFile, 0, name, 2) }

// colonLookup returns field want of the first line of file whose field key
// is value (fields separated by colons, as in passwd(5) and group(5)).
// Comments, NIS "+" and "-" entries and short lines are skipped; an
// unreadable file finds nothing.
func colonLookup(file string, key int, value string, want int) (string, bool) {
	f, err := os.Open(file)
	if err != nil {
		return "", false
	}
	defer f.Close()
	sc := bufio.NewScanner(io.LimitReader(f, 16<<20))
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' || line[0] == '+' || line[0] == '-' {
			continue
		}
		fields := strings.Split(line, ":")
		if len(fields) > max(key, want) && fields[key] == value && value != "" {
			return fields[want], true
		}
	}
	return "", false
}
