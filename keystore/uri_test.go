package keystore_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gwagent/gwagent/keystore"
)

func TestParse(t *testing.T) {
	tests := []struct {
		name, in string
		want     string // canonical String(); empty for failures
		wantErr  error
	}{
		{"ok/file", "file:/var/lib/gwagent/keys/op.key", "file:/var/lib/gwagent/keys/op.key", nil},
		{"ok/file-triple-slash", "file:///var/lib/k.key", "file:/var/lib/k.key", nil},
		{"ok/file-relative", "file:keys/k.key", "file:keys/k.key", nil},
		{"ok/tpm-handle", "tpm2:handle=0x81000100", "tpm2:handle=0x81000100", nil},
		{"ok/tpm-socket-blob", "tpm2:socket=/tmp/s;blob=/k/op.tpmkey", "tpm2:blob=/k/op.tpmkey;socket=/tmp/s", nil},
		{"ok/pkcs11", "pkcs11:token=gw;object=dev?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=/run/pin",
			"pkcs11:object=dev;token=gw?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=/run/pin", nil},
		{"ok/pkcs11-pin-redacted", "pkcs11:token=gw;object=dev?module-path=/m.so&pin-value=s3cret",
			"pkcs11:object=dev;token=gw?module-path=/m.so&pin-value=REDACTED", nil},
		{"ok/pkcs11-pct", "pkcs11:token=my%20token;object=k?module-path=/m.so", "pkcs11:object=k;token=my%20token?module-path=/m.so", nil},
		{"fail/no-scheme", "/var/lib/key", "", keystore.ErrBadURI},
		{"fail/unknown-scheme", "tpm:handle=0x81000001", "", keystore.ErrUnknownScheme},
		{"fail/file-empty", "file:", "", keystore.ErrBadURI},
		{"fail/file-host", "file://host/k.key", "", keystore.ErrBadURI},
		{"fail/tpm-no-location", "tpm2:device=/dev/tpmrm0", "", keystore.ErrBadURI},
		{"fail/tpm-bad-handle", "tpm2:handle=0x80000001", "", keystore.ErrBadURI},
		{"fail/tpm-both-devices", "tpm2:device=/dev/tpm0;socket=/s;handle=0x81000001", "", keystore.ErrBadURI},
		{"fail/tpm-unknown-attr", "tpm2:handle=0x81000001;colour=red", "", keystore.ErrBadURI},
		{"fail/tpm-query", "tpm2:handle=0x81000001?pin-value=x", "", keystore.ErrBadURI},
		{"fail/pkcs11-no-module", "pkcs11:token=gw;object=k", "", keystore.ErrBadURI},
		{"fail/pkcs11-no-token", "pkcs11:object=k?module-path=/m.so", "", keystore.ErrBadURI},
		{"fail/pkcs11-no-object", "pkcs11:token=gw?module-path=/m.so", "", keystore.ErrBadURI},
		{"fail/pkcs11-two-pins", "pkcs11:token=gw;object=k?module-path=/m.so&pin-value=1&pin-source=/p", "", keystore.ErrBadURI},
		{"fail/pkcs11-bad-pct", "pkcs11:token=%zz;object=k?module-path=/m.so", "", keystore.ErrBadURI},
		{"fail/pkcs11-public-type", "pkcs11:token=gw;object=k;type=public?module-path=/m.so", "", keystore.ErrBadURI},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			u, err := keystore.Parse(tc.in)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("Parse(%q): got %v, want %v", tc.in, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse(%q): %v", tc.in, err)
			}
			if got := u.String(); got != tc.want {
				t.Fatalf("String() = %q, want %q", got, tc.want)
			}
			again, err := keystore.Parse(u.Secret())
			if err != nil || again.Secret() != u.Secret() {
				t.Fatalf("round trip of %q: %v, %q", u.Secret(), err, again.Secret())
			}
		})
	}
}

func TestPINNeverInErrors(t *testing.T) {
	for _, in := range []string{
		"pkcs11:token=gw;object=k;bogus=1?module-path=/m.so&pin-value=hunter2",
		"pkcs11:token=gw?module-path=/m.so&pin-value=hunter2",
		"pkcs11:token=gw;object=k?module-path=/m.so&pin-value=hunter2&pin-source=/x",
		"nope:pin-value=hunter2",
		"pin-value=hunter2",
	} {
		_, err := keystore.Parse(in)
		if err == nil {
			t.Fatalf("Parse(%q) succeeded", in)
		}
		if strings.Contains(err.Error(), "hunter2") {
			t.Fatalf("error leaks the PIN: %v", err)
		}
	}
}

func TestPIN(t *testing.T) {
	dir := t.TempDir()
	pinFile := filepath.Join(dir, "pin")
	os.WriteFile(pinFile, []byte("1234\n"), 0o600)
	u := keystore.MustParse("pkcs11:token=gw;object=k?module-path=/m.so&pin-source=" + pinFile)
	if pin, err := u.PIN(); err != nil || pin != "1234" {
		t.Fatalf("PIN() = %q, %v; want 1234", pin, err)
	}
	u = keystore.MustParse("pkcs11:token=gw;object=k?module-path=/m.so&pin-source=" + filepath.Join(dir, "absent"))
	if _, err := u.PIN(); !errors.Is(err, keystore.ErrBadPIN) {
		t.Fatalf("unreadable pin-source: got %v, want ErrBadPIN (never an empty PIN)", err)
	}
}

func TestAlternate(t *testing.T) {
	for in, want := range map[string]string{
		"file:/s/keys/op.key":                         "file:/s/keys/op.b.key",
		"tpm2:socket=/t;blob=/s/op.tpmkey":            "tpm2:blob=/s/op.b.tpmkey;socket=/t",
		"tpm2:handle=0x81000100":                      "tpm2:handle=0x81000101",
		"pkcs11:token=gw;object=op?module-path=/m.so": "pkcs11:object=op-b;token=gw?module-path=/m.so",
	} {
		u := keystore.MustParse(in)
		a, err := u.Alternate()
		if err != nil || a.String() != want {
			t.Errorf("Alternate(%s) = %v, %v; want %s", in, a, err, want)
		}
		if a.StoreID() != u.StoreID() {
			t.Errorf("Alternate(%s) moved to another store", in)
		}
	}
	if _, err := keystore.MustParse("tpm2:handle=0x81FFFFFF").Alternate(); err == nil {
		t.Error("handle at the end of the range: no error")
	}
}
