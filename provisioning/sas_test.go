package provisioning

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"
)

// The reference values are computed here independently from the documented
// recipe (HMAC-SHA256 keyed with the decoded key over
// url-encoded(resource) + "\n" + expiry), not by calling the code under test.
func TestDPSToken(t *testing.T) {
	key := base64.StdEncoding.EncodeToString([]byte("0123456789abcdef0123456789abcdef"))
	k, err := ParseSymmetricKey(key, false, "")
	if err != nil {
		t.Fatal(err)
	}
	exp := time.Unix(1663952627, 0)
	tok := k.DPSToken("0ne00111111", "my-symkey-device", exp)
	m := hmac.New(sha256.New, []byte("0123456789abcdef0123456789abcdef"))
	m.Write([]byte("0ne00111111%2Fregistrations%2Fmy-symkey-device\n1663952627"))
	want := "SharedAccessSignature sr=0ne00111111%2Fregistrations%2Fmy-symkey-device&sig=" +
		url.QueryEscape(base64.StdEncoding.EncodeToString(m.Sum(nil))) + "&se=1663952627&skn=registration"
	if tok != want {
		t.Fatalf("token\n got %s\nwant %s", tok, want)
	}
	if s := fmt.Sprintf("%v %+v %#v", k, k, k); strings.Contains(s, "0123") || strings.Contains(s, key) {
		t.Fatalf("key printable: %s", s)
	}
}

func TestDeriveGroupKey(t *testing.T) {
	group := base64.StdEncoding.EncodeToString([]byte("group-key-material-32-bytes-long"))
	m := hmac.New(sha256.New, []byte("group-key-material-32-bytes-long"))
	m.Write([]byte("dev-7"))
	want := base64.StdEncoding.EncodeToString(m.Sum(nil))
	got, err := DeriveDeviceKey(group, "dev-7")
	if err != nil || got != want {
		t.Fatalf("DeriveDeviceKey = %q, %v; want %q", got, err, want)
	}
	k, _ := ParseSymmetricKey(group, true, "dev-7")
	d, _ := ParseSymmetricKey(want, false, "")
	exp := time.Unix(2000000000, 0)
	if k.DPSToken("s", "dev-7", exp) != d.DPSToken("s", "dev-7", exp) {
		t.Fatal("group-derived key differs from the derived device key")
	}
	if _, err := ParseSymmetricKey("not base64!!", false, ""); err == nil || strings.Contains(err.Error(), "not base64!!") {
		t.Fatalf("bad key: %v (must fail and not echo the key)", err)
	}
}
