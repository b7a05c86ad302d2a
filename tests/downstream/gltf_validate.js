// node gltf_validate.js FILE.glb: print the Khronos glTF validator's issues as JSON; exit 1 on errors.
// Needs the npm package gltf-validator (NODE_PATH or a node_modules folder above this file or the working folder).
const validator = require('gltf-validator');
const fs = require('fs');
validator.validateBytes(new Uint8Array(fs.readFileSync(process.argv[2])))
  .then((report) => {
    console.log(JSON.stringify(report.issues));
    process.exit(report.issues.numErrors > 0 ? 1 : 0);
  })
  .catch((error) => { console.error('validation failed: ' + error); process.exit(2); });
