package dps_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/azsim/dps"
	"github.com/gwagent/gwagent/devtools/testenv"
)

// restClient speaks to DPS's REST endpoint with net/http only.
func restClient(t *testing.T, az *azsimtest.Azsim, maxTLS uint16) *http.Client {
	pool := x509.NewCertPool()
	b, _ := os.ReadFile(az.Info.TrustBundle)
	pool.AppendCertsFromPEM(b)
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{
		RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS10, MaxVersion: maxTLS}}}
}

func rest(t *testing.T, c *http.Client, method, url, auth string, body any) (int, http.Header, map[string]any) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		j, _ := json.Marshal(body)
		rd = bytes.NewReader(j)
	}
	req, _ := http.NewRequest(method, url, rd)
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var m map[string]any
	json.NewDecoder(resp.Body).Decode(&m)
	return resp.StatusCode, resp.Header, m
}

func TestREST(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	c := restClient(t, az, 0)
	const regID = "rest-sym-1"
	var key string
	for _, e := range az.Server.DPS.Enrollments() {
		if e.ID == azsim.SymmetricKeyGroup {
			key, _ = dps.DeriveKey(e.PrimaryKey, regID)
		}
	}
	tok := sas(az.Info.IDScope, regID, key, time.Now().Add(time.Hour))
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	base := "https://" + az.Info.DPSHTTPSAddr + "/" + az.Info.IDScope + "/registrations/" + regID
	api := "?api-version=" + dps.MinCertAPIVersion

	st, hdr, body := rest(t, c, "PUT", base+"/register"+api, tok, map[string]any{"registrationId": regID, "csr": csrFor(t, p384, regID)})
	if st != 202 || hdr.Get("Retry-After") == "" || body["status"] != "assigning" {
		t.Fatalf("register: %d %v %v", st, hdr, body)
	}
	op := body["operationId"].(string)
	t.Run("fail/poll without a token", func(t *testing.T) {
		if st, _, _ := rest(t, c, "GET", base+"/operations/"+op+api, "", nil); st != 401 {
			t.Fatalf("status %d, want 401: every REST request authenticates", st)
		}
	})
	testenv.Eventually(t, 10*time.Second, "assigned", func() bool {
		st, _, body = rest(t, c, "GET", base+"/operations/"+op+api, tok, nil)
		return st == 200
	})
	rs, _ := body["registrationState"].(map[string]any)
	if body["status"] != "assigned" || rs["deviceId"] != regID || rs["issuedCertificateChain"] == nil {
		t.Fatalf("final answer %v", body)
	}

	t.Run("fail/unknown id scope", func(t *testing.T) {
		u := "https://" + az.Info.DPSHTTPSAddr + "/0ne00NOPE/registrations/" + regID + "/register" + api
		if st, _, _ := rest(t, c, "PUT", u, tok, map[string]any{}); st != 401 {
			t.Fatalf("status %d", st)
		}
	})
	t.Run("fail/no api-version", func(t *testing.T) {
		if st, _, _ := rest(t, c, "PUT", base+"/register", tok, map[string]any{}); st != 400 {
			t.Fatalf("status %d", st)
		}
	})
	t.Run("fail/TPM registration without an enrollment", func(t *testing.T) {
		st, _, body := rest(t, c, "PUT", base+"/register"+api, "", map[string]any{"registrationId": regID,
			"tpm": map[string]string{"endorsementKey": "AAAA", "storageRootKey": "AAAA"}})
		if st != 401 || body["authenticationKey"] != nil {
			t.Fatalf("%d %v", st, body)
		}
	})
	t.Run("fail/TLS 1.1 is refused", func(t *testing.T) {
		req, _ := http.NewRequest("PUT", base+"/register"+api, nil)
		if _, err := restClient(t, az, tls.VersionTLS11).Do(req); err == nil {
			t.Fatal("TLS 1.1 accepted")
		}
	})
}
