package main

import (
	"os"
	"path/filepath"
	"testing"
)

func TestAccountLookups(t *testing.T) {
	dir := t.TempDir()
	passwd := filepath.Join(dir, "passwd")
	group := filepath.Join(dir, "group")
	os.WriteFile(passwd, []byte(`# comment: gwagent:x:1:1::/:/bin/false
root:x:0:0:root:/root:/bin/bash
+gwagent:x:7:7::/:/bin/false
short:x
gwagent:x:998:997:gwagent:/nonexistent:/usr/sbin/nologin
gwagent:x:999:999:a second entry:/:/bin/false
::5:5:empty name:/:/bin/false
`), 0o644)
	os.WriteFile(group, []byte("gwagent-spool:x:996:gwagent\n"), 0o644)
	oldP, oldG := passwdFile, groupFile
	passwdFile, groupFile = passwd, group
	defer func() { passwdFile, groupFile = oldP, oldG }()

	for _, tc := range []struct {
		got  func() (string, bool)
		want string
		ok   bool
	}{
		{func() (string, bool) { return userID("gwagent") }, "998", true}, // the first real entry
		{func() (string, bool) { return userID("root") }, "0", true},
		{func() (string, bool) { return userID("short") }, "", false},
		{func() (string, bool) { return userID("nobody") }, "", false},
		{func() (string, bool) { return userID("") }, "", false},
		{func() (string, bool) { return userName("998") }, "gwagent", true},
		{func() (string, bool) { return userName("7") }, "", false}, // NIS entry
		{func() (string, bool) { return groupID("gwagent-spool") }, "996", true},
		{func() (string, bool) { return groupID("gwagent") }, "", false},
	} {
		if got, ok := tc.got(); got != tc.want || ok != tc.ok {
			t.Errorf("got %q, %v; want %q, %v", got, ok, tc.want, tc.ok)
		}
	}
	passwdFile = filepath.Join(dir, "missing")
	if _, ok := userID("root"); ok {
		t.Error("a missing passwd file found root")
	}
}
