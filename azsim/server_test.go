package azsim_test

import (
	"bufio"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/azsim/azsimtest"
)

// The admin API has no authentication; a browser page driving it through
// DNS rebinding sends its own name as Host, which must be refused.
func TestAdminHostCheck(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{ServerNames: []string{"azsim.test"}})
	port := az.Info.AdminURL[strings.LastIndex(az.Info.AdminURL, ":")+1:]
	for _, tc := range []struct {
		host string
		ok   bool
	}{
		{"127.0.0.1:" + port, true},
		{"localhost:" + port, true},
		{"LocalHost", true},
		{"127.0.0.1", true},
		{"[::1]:" + port, true},
		{"[::1]", true},
		{"azsim.test:8480", true}, // named with --server-names (the image check's VM)
		{"attacker.example:" + port, false},
		{"attacker.example", false},
		{"localhost.attacker.example", false},
		{"127.0.0.1.nip.io:" + port, false},
		{"10.0.0.1:" + port, false},
	} {
		name := "fail/"
		if tc.ok {
			name = "ok/"
		}
		t.Run(name+tc.host, func(t *testing.T) {
			req, _ := http.NewRequest("GET", az.Info.AdminURL+"/info", nil)
			req.Host = tc.host
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			if tc.ok {
				var inf azsim.Info
				if resp.StatusCode != 200 || json.Unmarshal(b, &inf) != nil || inf.IDScope == "" {
					t.Fatalf("status %d: %s", resp.StatusCode, b)
				}
				return
			}
			var e struct{ Error string }
			if resp.StatusCode != http.StatusForbidden || json.Unmarshal(b, &e) != nil || !strings.Contains(e.Error, "DNS rebinding") {
				t.Fatalf("status %d: %s, want 403 explaining the Host check", resp.StatusCode, b)
			}
		})
	}
	t.Run("fail/HTTP 1.0 without Host", func(t *testing.T) {
		c, err := net.Dial("tcp", strings.TrimPrefix(az.Info.AdminURL, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, "GET /info HTTP/1.0\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden {
			t.Fatalf("status %d, want 403", resp.StatusCode)
		}
	})
}
