package mqttconn

import (
	"strings"
	"testing"
)

func TestNoProxy(t *testing.T) {
	for _, tc := range []struct {
		name, rules, target string
		direct              bool
	}{
		{"ok/empty list proxies everything, loopback too", "", "localhost:8883", false},
		{"ok/star", "*", "hub.azure-devices.net:443", true},
		{"ok/exact host", "localhost", "localhost:8883", true},
		{"ok/domain matches subdomains", "azure-devices.net", "myhub.azure-devices.net:443", true},
		{"ok/leading dot", ".azure-devices.net", "myhub.azure-devices.net:8883", true},
		{"ok/wildcard prefix", "*.local", "edge.local:8883", true},
		{"ok/no partial label match", "devices.net", "myhub.azure-devices.net:443", false},
		{"ok/ip", "10.0.0.5", "10.0.0.5:8883", true},
		{"ok/cidr", "10.0.0.0/8, 192.168.0.0/16", "192.168.1.20:443", true},
		{"ok/cidr miss", "10.0.0.0/8", "11.0.0.1:443", false},
		{"ok/port must match when given", "edge.local:8883", "edge.local:443", false},
		{"ok/port match", "edge.local:8883", "edge.local:8883", true},
		{"ok/ipv6", "::1", "[::1]:8883", true},
		{"ok/case and trailing dot", "HUB.example", "hub.example.:443", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := parseNoProxy(tc.rules).match(tc.target); got != tc.direct {
				t.Fatalf("no_proxy %q, %s: direct = %v, want %v", tc.rules, tc.target, got, tc.direct)
			}
		})
	}
}

func TestParseProxy(t *testing.T) {
	for _, tc := range []struct{ name, in, want, err string }{
		{"ok/full", "http://u:p@proxy.site:3128", "http://u:p@proxy.site:3128", ""},
		{"ok/bare host:port", "proxy.site:3128", "http://proxy.site:3128", ""},
		{"ok/default port 80", "http://proxy.site", "http://proxy.site:80", ""},
		{"ok/trailing slash", "http://proxy.site:8080/", "http://proxy.site:8080", ""},
		{"fail/https proxy", "https://u:secret@proxy.site:443", "", "not supported"},
		{"fail/socks", "socks5://proxy.site:1080", "", "not supported"},
		{"fail/path", "http://u:secret@proxy.site:3128/x", "", "no path"},
		{"fail/unparsable keeps the password out", "http://u:sec ret%zz@proxy:1", "", "not a URL"},
		{"fail/no host", "http://", "", "no host"},
		{"ok/spaces around", "  http://proxy.site:3128 \n", "http://proxy.site:3128", ""},
		{"ok/ipv6", "[::1]:3128", "http://[::1]:3128", ""},
		{"ok/user without password", "u@proxy.site:3128", "http://u@proxy.site:3128", ""},
		{"ok/percent-encoded password", "http://u:p%40s%23s@proxy.site:3128", "http://u:p%40s%23s@proxy.site:3128", ""},
		// A password with an unencoded # or / splits the URL: part of it
		// parses as host:port, the rest as fragment or path. The error
		// shows neither and says how to write it.
		{"fail/unencoded # in password", "http://u:12#secret@proxy.site:3128", "", "%23"},
		{"fail/unencoded / in password", "http://u:12/secret@proxy.site:3128", "", "%2F"},
		{"fail/unencoded ? in password", "http://u:12?secret@proxy.site:3128", "", "%3F"},
		{"fail/port out of range", "http://u:secret@proxy.site:99999", "", "port 99999 is not 1-65535"},
		{"fail/port zero", "http://proxy.site:0", "", "port 0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u, err := ParseProxy(tc.in)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err %v, want %q", err, tc.err)
				}
				if strings.Contains(err.Error(), "secret") || strings.Contains(err.Error(), "sec ret") {
					t.Fatalf("error shows the password: %v", err)
				}
				return
			}
			if err != nil || u.String() != tc.want {
				t.Fatalf("got %v, %v; want %s", u, err, tc.want)
			}
		})
	}
}

func TestProxyFromEnvironment(t *testing.T) {
	env := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }
	pf, err := ProxyFromEnvironment(env(map[string]string{"https_proxy": "http://a:1", "HTTPS_PROXY": "http://b:2", "NO_PROXY": "localhost"}))
	if err != nil {
		t.Fatal(err)
	}
	if u, _ := pf("hub.example:443"); u == nil || u.Host != "a:1" {
		t.Fatalf("lower case first: %v", u)
	}
	if u, _ := pf("localhost:8883"); u != nil {
		t.Fatalf("NO_PROXY ignored: %v", u)
	}
	if pf, _ := ProxyFromEnvironment(env(nil)); pf != nil {
		t.Fatal("a proxy without https_proxy")
	}
	if _, err := ProxyFromEnvironment(env(map[string]string{"HTTPS_PROXY": "ftp://u:pw-123@x:1"})); err == nil || !strings.Contains(err.Error(), "https_proxy") || strings.Contains(err.Error(), "pw-123") {
		t.Fatalf("bad https_proxy: %v", err)
	}
}
