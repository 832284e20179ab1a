// Command etcd starts the etcd server from the published go.etcd.io/etcd/server/v3 module.
//
// etcd's own command lives in a module with relative replace directives, so it cannot be
// installed with "go install pkg@version"; this wrapper calls the same entry point instead.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
